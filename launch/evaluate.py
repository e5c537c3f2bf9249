"""Evaluate every replica of a run on the evaluation sets and the soft-token attack (SPEC §9).

    python -m launch.evaluate --run runs/ssft [--config configs/evaluate.py:tiny] [--config.n=500]

Writes ``<run>/eval/{metrics.json, table.md, info.json, adversarial.npz}``.
``safety_mech.evaluation.evaluate_run`` does the work.
"""
from absl import app, flags

from safety_mech import cli, setups, study
from safety_mech.evaluation import EvaluationConfig

CONFIG = cli.ConfigFlag(('evaluate', 'tiny'), "configs/evaluate.py:paper")
RUN = flags.DEFINE_string("run", None, "run directory to evaluate (config.json + checkpoints/)")


def main(argv):
    cli.main(argv, ("run",), lambda: study.evaluate(RUN.value, setups.validate_flat(
        EvaluationConfig, CONFIG.value, None)))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

"""The analyses of SPEC §10 for fine-tuned runs against their pretrained base.

    python -m launch.analyze --base runs/pre --runs runs/ssft,runs/dpo,runs/unlearn --out runs/analysis \\
        [--config configs/analyze.py:paper] [--config.n=512]

Writes ``<out>/analysis.json`` and its figures. ``safety_mech.analysis.suite.analyze`` does the work.
"""
from absl import app, flags

from safety_mech import cli, setups, study
from safety_mech.analysis.suite import AnalysisConfig

CONFIG = cli.ConfigFlag(('analyze', 'tiny'), "configs/analyze.py:paper")
BASE = flags.DEFINE_string("base", None, "pretraining run directory (θ_IT)")
RUNS = flags.DEFINE_list("runs", None, "fine-tuned run directories, comma-separated")
OUT = flags.DEFINE_string("out", None, "output directory (analysis.json and the figures)")


def main(argv):
    cli.main(argv, ("base", "runs", "out"), lambda: study.analyze(
        BASE.value, RUNS.value, OUT.value, setups.validate_flat(AnalysisConfig, CONFIG.value, None)))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

"""The analyses of SPEC §10 for fine-tuned runs against their pretrained base.

    python -m launch.analyze --base runs/pre --runs runs/ssft,runs/dpo,runs/unlearn --out runs/analysis \\
        [--config configs/analyze.py:tiny] [--config.n=512]

Writes ``<out>/analysis.json`` and its figures. ``safety_mech.analysis.suite.analyze`` does the work.
"""
from absl import app, flags
from ml_collections import config_flags

from configs import analyze as analyze_config
from safety_mech import cli, setups, study
from safety_mech.analysis.suite import AnalysisConfig

CONFIG = config_flags.DEFINE_config_file("config", None, "default configs/analyze.py:tiny (overrides need it named)",
                                         lock_config=True)
BASE = flags.DEFINE_string("base", None, "pretraining run directory (θ_IT)")
RUNS = flags.DEFINE_list("runs", None, "fine-tuned run directories, comma-separated")
OUT = flags.DEFINE_string("out", None, "output directory (analysis.json and the figures)")


def main(argv):
    cli.main(argv, ("base", "runs", "out"), lambda: study.analyze(
        BASE.value, RUNS.value, OUT.value, setups.validate_flat(AnalysisConfig, (CONFIG.value or analyze_config.get_config("tiny")), None)))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

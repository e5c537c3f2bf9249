"""Pretrain (instruction-tune) the model of SPEC §5.

    python -m launch.pretrain --config configs/pretrain.py:tiny --workdir runs/pretrain_tiny

Writes ``<workdir>/config.json``, ``metrics.jsonl`` and ``checkpoints/``; the same command again
resumes from the latest checkpoint (``--max_minutes M``: pause at M minutes with a checkpoint, exit
status 75). ``safety_mech.study.pretrain`` does the work.
"""
from absl import app, flags

from safety_mech import cli, study

CONFIG = cli.ConfigFlag(None, "configs/pretrain.py:tiny")
WORKDIR = flags.DEFINE_string("workdir", None, "run directory, e.g. runs/<name>")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
MAX_MINUTES = cli.DEFINE_max_minutes()


def main(argv):
    cli.main(argv, ("config", "workdir"),
             lambda: study.pretrain(CONFIG.value, WORKDIR.value, distributed=DISTRIBUTED.value,
                                    deadline=cli.deadline(MAX_MINUTES.value)))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

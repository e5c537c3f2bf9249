"""Safety fine-tuning (SPEC §8) of a base run: SSFT, DPO or unlearning.

    python -m launch.finetune --config configs/finetune.py:ssft:tiny --base runs/pretrain_tiny \\
        --workdir runs/ssft_tiny [--base_replica N] [--config.method.beta=0.1 ...]

The base is a pretraining run, or a fine-tuned run (cross-method fine-tuning; ``--base_replica``
picks one of its replicas). The same command again resumes (``--max_minutes M``: pause at M
minutes with a checkpoint, exit status 75). ``safety_mech.study.finetune`` does the work.
"""
from absl import app, flags

from safety_mech import cli, study

CONFIG = cli.ConfigFlag(None, "configs/finetune.py:ssft:tiny")
BASE = flags.DEFINE_string("base", None, "base run directory (pretraining or fine-tuning run)")
BASE_REPLICA = flags.DEFINE_integer("base_replica", None, "replica of the base run (when it has several)")
WORKDIR = flags.DEFINE_string("workdir", None, "run directory, e.g. runs/<name>")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
MAX_MINUTES = cli.DEFINE_max_minutes()


def main(argv):
    cli.main(argv, ("config", "base", "workdir"), lambda: study.finetune(
        CONFIG.value, BASE.value, WORKDIR.value, base_replica=BASE_REPLICA.value, distributed=DISTRIBUTED.value,
        deadline=cli.deadline(MAX_MINUTES.value)))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

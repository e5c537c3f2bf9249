"""The whole study in one command: pretrain -> SSFT, DPO, unlearning -> evaluation and the attack
-> analyses -> report (``<workdir>/report/REPORT.md``, ``results.json``, figures).

    python -m launch.reproduce --workdir runs/repro                      # the CPU default (tiny)
    python -m launch.reproduce --workdir runs/repro_paper --config configs/reproduce.py:paper

The same command again skips finished stages and resumes an interrupted one. In parts of at most
M minutes each (short GPU allocations): ``--max_minutes M``; a part that stops early saves a
checkpoint and exits with status 75, and the same command continues::

    while python -m launch.reproduce --workdir runs/repro_paper --config configs/reproduce.py:paper \
        --max_minutes 9; [ $? -eq 75 ]; do :; done
``safety_mech.study.reproduce`` does the work.
"""
from absl import app, flags

from safety_mech import cli, study

CONFIG = cli.ConfigFlag(('reproduce', 'tiny'), "configs/reproduce.py:paper")
WORKDIR = flags.DEFINE_string("workdir", None, "the study's directory, e.g. runs/repro")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
MAX_MINUTES = cli.DEFINE_max_minutes()
COMPILATION_CACHE = flags.DEFINE_bool("compilation_cache", True, "cache compiled programs in <workdir>/.jax_cache")


def main(argv):
    cli.main(argv, ("workdir",), lambda: study.reproduce(
        CONFIG.value, WORKDIR.value, distributed=DISTRIBUTED.value, compilation_cache=COMPILATION_CACHE.value,
        deadline=cli.deadline(MAX_MINUTES.value)))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

"""Run every point of a sweep file and write their comparison table.

    python -m launch.sweep --sweep configs/sweeps/micro_text_length.py --workdir runs/micro_text_length
    python -m launch.sweep --sweep configs/sweeps/concept_feature.py --workdir runs/concept --stage pretrain

Each run of replicas lives in ``<workdir>/<name from its overrides>`` (pretraining runs under
``<workdir>/pretrain/``); ``comparison.md``, ``comparison.json`` and ``plot.png`` are rewritten
after every finished run. The same command again skips finished runs and resumes an interrupted one. ``safety_mech.sweeps.run`` does the work.
"""
from absl import app, flags

from safety_mech import cli, sweeps

SWEEP = flags.DEFINE_string("sweep", None, "a sweep file, e.g. configs/sweeps/micro_text_length.py")
WORKDIR = flags.DEFINE_string("workdir", None, "the sweep's directory, e.g. runs/<sweep name>")
STAGE = flags.DEFINE_enum("stage", None, sweeps.STAGES, "how far each point runs (default: the sweep file's)")
POINTS = flags.DEFINE_list("points", [], "run only the runs holding these points (1-based), e.g. 4,5")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "validate every point and list the runs, then stop")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
COMPILATION_CACHE = flags.DEFINE_bool("compilation_cache", True, "cache compiled programs in <workdir>/.jax_cache")


def _points() -> list[int]:
    try:
        return [int(p) for p in POINTS.value]
    except ValueError:
        raise sweeps.ConfigError(f"--points {','.join(POINTS.value)}: use point numbers, e.g. 4,5") from None


def main(argv):
    cli.main(argv, ("sweep",) if DRY_RUN.value else ("sweep", "workdir"), lambda: sweeps.run(
        sweeps.load(SWEEP.value), WORKDIR.value, STAGE.value, only=_points(), distributed=DISTRIBUTED.value,
        compilation_cache=COMPILATION_CACHE.value, dry_run=DRY_RUN.value))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

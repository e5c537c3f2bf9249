r"""Print samples of the synthetic data (fields: ``safety_mech/examples.py``).

    python -m launch.sample --set pretrain --n 3                   # readable
    python -m launch.sample --set jb_co_task --n 1000 --json       # one JSON object per line
    python -m launch.sample --set pretrain --n 5 --step 60000      # curriculum at step 60k
"""
import json
import sys

from absl import app, flags, logging

from safety_mech import data, examples

SET = flags.DEFINE_enum("set", None, examples.SETS, "Which data to sample.")
N = flags.DEFINE_integer("n", 5, "Number of examples.", lower_bound=1)
SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
STEP = flags.DEFINE_integer("step", 0, "Training step (pretraining curriculum).", lower_bound=0)
MIN_LEN = flags.DEFINE_integer("min_len", 25, "Shortest text window.", lower_bound=1)
MAX_LEN = flags.DEFINE_integer("max_len", 35, "Longest text window.", lower_bound=1)
P_UNSAFE = flags.DEFINE_float("p_unsafe", 0.2, "Fraction of unsafe fine-tuning examples.")
JSON = flags.DEFINE_bool("json", False, "One JSON object per line instead of readable text.")
flags.mark_flag_as_required("set")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # no backend-probing chatter on stderr
    try:
        cfg = data.DataConfig(min_len=MIN_LEN.value, max_len=MAX_LEN.value, p_unsafe=P_UNSAFE.value)
    except ValueError as e:
        sys.exit(f"error: {e}")
    for i, rec in enumerate(examples.sample_records(SET.value, N.value, SEED.value, STEP.value, cfg)):
        print(json.dumps(rec, ensure_ascii=False) if JSON.value else examples.format_record(i, rec))


if __name__ == "__main__":
    app.run(main)

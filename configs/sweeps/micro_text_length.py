"""Text length × seed on the micro preset: two lengths, three pretraining seeds (six points, two
runs of three replicas). A smoke test of the sweep machinery; the micro model learns nothing.

    python -m launch.sweep --sweep configs/sweeps/micro_text_length.py --workdir runs/micro_text_length

44 seconds on one core of a CPU VM.
"""
from configs import reproduce
from safety_mech.sweeps import axis, product, zipped


def get_sweep():
    lengths = zipped(axis("pretrain.data.min_len", [6, 8]), axis("pretrain.data.max_len", [6, 8]))
    return dict(
        config=reproduce.get_config("micro"),
        points=product(lengths, axis("pretrain.train.seeds", [0, 1, 2])),
        metrics=("eval/safe/tf_token_acc", "train/loss"),
        stage="pretrain",
    )

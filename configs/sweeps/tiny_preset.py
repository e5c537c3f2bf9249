"""The tiny pretraining preset against its nearest alternatives: another seed, the SPEC operator
rule in pretraining, 8-letter text, a third layer.

    python -m launch.sweep --sweep configs/sweeps/tiny_preset.py --workdir runs/tiny_preset

Five points in four runs of 6000 steps (the two seeds are replicas of one run); the preset alone
pretrains in 15 minutes on a 2-core CPU VM. Target: Instruct (``eval/safe/gen_instruct``, 1000 held-out safe inputs) ≥ 0.99.
Readings: ``docs/experiments.md`` §1.3.
"""
from configs import reproduce


def get_sweep():
    return dict(
        config=reproduce.get_config("tiny"),
        points=[
            {},  # the preset
            {"pretrain.train.seeds": 1},
            {"pretrain.data.p_four_iid": 0.5},
            {"pretrain.data.min_len": 8, "pretrain.data.max_len": 8},
            {"pretrain.model.n_layer": 3},
        ],
        metrics=("eval/safe/gen_instruct", "eval/safe/tf_token_acc"),
        stage="pretrain",
    )

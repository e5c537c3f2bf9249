"""Evaluation of a run (SPEC §9): every evaluation set and the soft-token attack, every replica.

    python -m launch.evaluate --run runs/ssft_tiny                       # tiny (default)
    python -m launch.evaluate --run runs/ssft_tiny --config configs/evaluate.py:paper
    python -m launch.evaluate --run runs/ssft_tiny --config.attack=False --config.n=500

Writes ``<run>/eval/{metrics.json, table.md, info.json, adversarial.npz}`` (``safety_mech/
evaluation.py``). ``tiny``: 1000 examples per set, the attack on 64 unsafe examples and its budget
sweep (0.25..4) on 16; ``paper``: the attack on 1000, the budget and k sweeps on 256; ``micro``: 16
examples, a 3-step attack on 8 (smoke test).
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from configs.common import check_size
from safety_mech.safety_data import EVAL_SETS


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    check_size(arg)
    c = ml_collections.ConfigDict(dict(
        sets=EVAL_SETS,  # evaluation sets (SPEC §9)
        n=1000,  # examples per set
        chunk=placeholder(int),  # examples per compiled call; unset: the run's eval.batch_size
        attack=True,  # the soft-token attack (k = 2, budget 1) on the unsafe set
        attack_n=64,  # unsafe examples attacked (50 forward+backward passes each)
        sweep_n=placeholder(int),  # of those, how many the budget / k sweeps attack; unset: attack_n
        attack_steps=50,
        sweep_budget=True,  # attack success vs budget 0.25..4
        sweep_k=False,  # attack success vs k = 1..8
        name=placeholder(str),  # model-name prefix; unset: the run's method ("pretrain" for pretraining)
        ckpt_step=placeholder(int),  # unset: the latest checkpoint
    ))
    if arg == "tiny":
        c.sweep_n = 16
    if arg == "paper":
        c.update(attack_n=1000, sweep_n=256, sweep_k=True)
    if arg == "micro":
        c.update(n=16, attack_n=8, attack_steps=3, sweep_budget=False)
    return c

"""The analyses of SPEC §10 for fine-tuned runs against their pretrained base.

    python -m launch.analyze --base runs/pre --runs runs/ssft,runs/dpo,runs/unlearn --out runs/analysis
    python -m launch.analyze ... --config configs/analyze.py:paper "--config.arithmetic=('ssft/lr=0.001/seed=0+dpo/lr=0.001/seed=0',)"

Writes ``<out>/analysis.json`` and its figures (``safety_mech/analysis/suite.py``). ``tiny``: 256
examples per set (about a minute for six models on a 2-core CPU VM); ``paper``: 1000; ``micro``:
8 examples, α in {0, 1, 2} (smoke test).
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from configs.common import check_size
from safety_mech.safety_data import EVAL_SETS


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    check_size(arg)
    c = ml_collections.ConfigDict(dict(
        n=256,  # examples per evaluation set
        n_heldout=placeholder(int),  # held-out safe / unsafe examples for the cluster means; unset: n
        sets=EVAL_SETS,  # evaluation sets (safe and unsafe required)
        alphas=(0.0, 0.5, 1.0, 1.5, 2.0),  # α of the sweep θ_IT + α·ΔW (SPEC §10.6)
        alpha_modes=("all", "mlp"),  # sweep all weights and/or the MLP only
        seed=0,  # key of the analysed inputs
        energy=0.9,  # energy cut of the ranks and column spaces (SPEC §10)
        top=8,  # singular directions reported per matrix
        batch_size=128,  # examples per forward pass
        base_replica=placeholder(int),  # replica of the base run, if it has several
        arithmetic=(),  # "A+B": also analyse θ_IT + ΔW_A + ΔW_B (model names)
    ))
    if arg == "paper":
        c.n = 1000
    if arg == "micro":
        c.update(n=8, alphas=(0.0, 1.0, 2.0), alpha_modes=("all",), batch_size=8)
    return c

"""The whole study in one config, for ``launch/reproduce.py`` (``safety_mech.study.reproduce``).

    python -m launch.reproduce --workdir runs/repro                                   # tiny (CPU)
    python -m launch.reproduce --workdir runs/repro_paper --config configs/reproduce.py:paper
    python -m launch.reproduce --workdir /tmp/repro_micro --config configs/reproduce.py:micro
    python -m launch.reproduce --workdir runs/repro --config.finetune.dpo.method.beta=0.1

Groups: ``pretrain`` (``configs/pretrain.py``), ``finetune.ssft`` / ``.dpo`` / ``.unlearn``
(``configs/finetune.py``; model and data lengths from the pretraining config), ``evaluate``
(``configs/evaluate.py``), ``analyze`` (``configs/analyze.py``), all of one size.

* ``tiny``: the CPU default study; its report is ``docs/results/`` (command, stage times and the
  numbers there). The fine-tuning runs' own final evaluation uses 256 examples per set; the
  evaluation stage scores 1000.
* ``paper``: SPEC's scale, for a GPU/TPU.
* ``micro``: every stage in about two minutes on 2 CPU cores; learns nothing (the end-to-end test).
"""
from __future__ import annotations

import ml_collections

from configs import analyze, evaluate, finetune, pretrain
from configs.common import check_size

METHODS = finetune.METHODS


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    check_size(arg)
    c = ml_collections.ConfigDict()
    c.base = ""  # a shipped pretrained base (safety_mech/bases/) to start from; "": pretrain in the study
    c.pretrain = pretrain.get_config(arg)
    c.finetune = ml_collections.ConfigDict({m: finetune.get_config(f"{m}:{arg}") for m in METHODS})
    c.evaluate = evaluate.get_config(arg)
    c.analyze = analyze.get_config(arg)
    if arg == "tiny":
        c.base = "tiny"
        for m in METHODS:
            c.finetune[m].eval.n_final = 256
    return c

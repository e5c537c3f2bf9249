"""The whole study in one config, for ``launch/reproduce.py``.

Commands (``get_config(SIZE)``, SIZE in tiny|paper|micro; dotted overrides work for every key)::

    python -m launch.reproduce --workdir runs/repro                                   # tiny (CPU)
    python -m launch.reproduce --workdir runs/repro_paper --config configs/reproduce.py:paper
    python -m launch.reproduce --workdir /tmp/repro_micro --config configs/reproduce.py:micro
    python -m launch.reproduce --workdir runs/repro --config.finetune.dpo.method.beta=0.1

Groups:

* ``pretrain``: a ``configs/pretrain.py`` config (``tiny`` or ``paper``);
* ``finetune.ssft``, ``finetune.dpo``, ``finetune.unlearn``: ``configs/finetune.py`` configs of the
  same size; their model and data lengths come from the pretraining run, as for ``launch.finetune``;
* ``evaluate``: arguments of ``launch.evaluate.run`` for every fine-tuned run (``sets``, ``n``
  examples per set, ``attack``, ``attack_n`` unsafe examples attacked, ``attack_steps``,
  ``sweep_budget``, ``sweep_k``);
* ``analyze``: arguments of ``launch.analyze.run`` (``n``, ``sets``, ``alphas``, ``alpha_modes``,
  ``seed``, ``energy``, ``batch_size``).

``micro`` is the ``tiny`` shape shrunk to a smoke test (1 layer, d=16, a few steps, small sets): it
exercises every stage in about two minutes on 2 CPU cores and learns nothing; the end-to-end test
uses it.
"""
from __future__ import annotations

import ml_collections

from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from safety_mech import data as data_lib

METHODS = ("ssft", "dpo", "unlearn")
SIZES = ("tiny", "paper", "micro")
GROUPS = ("pretrain", "finetune", "evaluate", "analyze")

_EVALUATE = {
    # tiny: every set on 1000 examples (SPEC §9); the attack (50 forward+backward passes per example)
    # on 128 unsafe examples to stay inside the 15-minute CPU budget (its column is degenerate for
    # the tiny model anyway: the soft tokens push the targets past its learned positions)
    "tiny": dict(n=1000, attack_n=128),
    "paper": dict(n=1000, attack_n=1000, sweep_budget=True, sweep_k=True),
    "micro": dict(n=16, attack_n=8, attack_steps=3),
}
_ANALYZE = {
    "tiny": dict(n=256),
    "paper": dict(n=1000),
    "micro": dict(n=8, alphas=(0.0, 1.0, 2.0), alpha_modes=("all",), batch_size=8),
}
_MICRO_MODEL = dict(n_layer=1, n_head=2, d_model=16, d_mlp=32)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """The ``tiny``, ``paper`` or ``micro`` study (see the module docstring)."""
    if arg not in SIZES:
        raise ValueError(f"unknown size {arg!r}; use one of {SIZES}")
    size = "paper" if arg == "paper" else "tiny"
    cfg = ml_collections.ConfigDict()
    cfg.pretrain = pretrain_config.get_config(size)
    cfg.finetune = ml_collections.ConfigDict({m: finetune_config.get_config(f"{m}:{size}") for m in METHODS})
    cfg.evaluate = ml_collections.ConfigDict(dict(
        sets=tuple(data_lib.EVAL_SETS), n=1000, attack=True, attack_n=1000, attack_steps=50,
        sweep_budget=False, sweep_k=False))
    cfg.evaluate.update(_EVALUATE[arg])
    cfg.analyze = ml_collections.ConfigDict(dict(
        n=256, sets=tuple(data_lib.EVAL_SETS), alphas=(0.0, 0.5, 1.0, 1.5, 2.0), alpha_modes=("all", "mlp"), seed=0,
        energy=0.9, batch_size=128))
    cfg.analyze.update(_ANALYZE[arg])
    if arg == "tiny":
        for m in METHODS:  # launch.evaluate scores 1000 examples of every set afterwards
            cfg.finetune[m].eval.n_final = 256
    if arg == "micro":
        cfg.pretrain.model.update(_MICRO_MODEL)
        cfg.pretrain.train.update(steps=6, log_every=3, eval_every=6, ckpt_every=6)
        cfg.pretrain.opt.update(warmup_steps=2, decay_end_step=6)
        cfg.pretrain.eval.update(n_periodic=8, n_final=8, batch_size=8)
        for m in METHODS:
            ft = cfg.finetune[m]
            ft.train.update(steps=4, batch_size=8, log_every=2, eval_every=4, ckpt_every=4)
            ft.opt.update(warmup_steps=1, decay_end_step=4)
            ft.eval.update(n_periodic=8, n_final=8, batch_size=8)
    return cfg


def finetune_configs(cfg) -> dict:
    """Each method's fine-tuning config resolved against the pretraining config (model and data
    lengths), validated: {method: (resolved ConfigDict, FinetuneSetup)}; one-line ConfigError."""
    base = cfg.pretrain.to_dict()
    out = {}
    for m in METHODS:
        resolved = finetune_config.inherit_from_base(cfg.finetune[m], base, "config.pretrain")
        out[m] = (resolved, finetune_config.validate(resolved))
    return out

"""Safety fine-tuning (SPEC §7-§8): SSFT, DPO or unlearning from a pretrained (or fine-tuned) base run.

Command (``get_config("METHOD:SIZE")``, METHOD in ssft|dpo|unlearn, SIZE in tiny|paper; dotted
overrides work for every key)::

    python -m launch.finetune --config configs/finetune.py:ssft:tiny --base runs/pretrain_tiny \\
        --workdir runs/ssft_tiny
    python -m launch.finetune --config configs/finetune.py:dpo:paper --base runs/pretrain_paper \\
        --workdir runs/dpo_paper
    # textbook DPO (one β for both terms):   --config.method.beta=0.1
    # cross-method (unlearning after SSFT's ηM replica):
    python -m launch.finetune --config configs/finetune.py:unlearn:tiny --base runs/ssft_tiny \\
        --base_replica 0 --workdir runs/ssft_then_unlearn_tiny

The model (``config.model``), the data lengths (``data.min_len``, ``data.max_len``,
``data.seq_len``) and the operator rule (``data.p_four_iid``) are unset here and read from the base
run's ``config.json`` at launch time (:func:`inherit_from_base`); setting one to a value the base was
not trained with is a one-line error naming the key.

Presets (both: AdamW as pretraining, β = (0.9, 0.95), weight decay 1e-4 on dense kernels, clip 1.0;
two learning rates ηM ("medium") and ηS ("small") as vmapped replicas, ``train.n_replicas=2``,
``opt.replica_lrs=(ηM, ηS)``; every replica starts from the base params with a fresh optimizer
state and its own data stream; per-example safe/unsafe mixing with ``data.p_unsafe`` SSFT 0.2,
DPO 0.5, unlearning 0.5; ``method.normalize="seq_len"``, REF's normalisation). More seeds per
learning rate are more replicas, e.g. ``--config.train.n_replicas=4
--config.opt.replica_lrs="(1e-4,1e-4,1e-5,1e-5)"`` (replica r draws its own data stream from
``train.seed``), or another ``--config.train.seed``:

* ``paper``: SPEC §8 exactly: 10k steps, batch 512, warmup 2k, cosine to 1e-6 at step 8k, ηM = 1e-4,
  ηS = 1e-5; DPO β_w = 0.1, β_l = 0.01; unlearning w_w = 1, w_l = 0.1. For a GPU/TPU (base: the
  ``pretrain.py:paper`` run). Runtime: to be measured.
* ``tiny``: the same shape scaled to the CPU: 300 steps of batch 64, warmup 20, cosine to 1e-6 at
  step 300, ηM = 1e-3, ηS = 1e-4 (ratio 10 as in the paper; of 1e-3 and 3e-4, 1e-3 raised Null
  further in 300 steps), base: the ``pretrain.py:tiny`` run. Only the final evaluation runs (``launch.evaluate``
  scores every set afterwards). Measured in session 3 (2-core VM, alone; the stages of two
  reproduce runs, base = the tiny pretraining at 100% Instruct): SSFT 78-79 s, DPO 120-121 s,
  unlearning 104-109 s, 303-309 s in all (both replicas, compilation and the final evaluation
  included; 183 / 353 / 312 ms per step); session 4, with ``safety_mech/host_memory.py``: 86 / 119 /
  96 s, 301 s in all (of which compilation ~17 / 13 / 13 s and setup plus final evaluation ~14 / 5 /
  3 s), bit-identical metrics. At ηM, Instruct on safe / Null on unsafe (1000 inputs
  each): SSFT 90.3% / 42.9%, DPO 73.1% / 73.6%, unlearning 64.8% / 78.1%; at ηS: 76.7 / 13.6,
  55.0 / 38.4, 49.5 / 50.5 (session 2's model code, which summed in another order: 90.7 / 37.6,
  69.2 / 70.3, 63.1 / 77.1 at ηM). Session 6 (model changes that alter float rounding; another
  base run, also 100% Instruct): 70 / 87 / 77 s, 234 s in all; at ηM 86.7 / 30.2, 70.9 / 68.3,
  64.2 / 74.5, at ηS 73.2 / 9.3, 48.9 / 28.8, 44.2 / 39.6. The tiny model's 6-letter texts do not always reveal
  the grammar branch that makes an input unsafe (README.md), but 8-letter texts (Bayes error 0.12
  instead of 0.22) gave the same numbers with this recipe (session 4, ηM: 89.3 / 46.6, 61.7 / 73.6,
  56.2 / 77.5), so the recipe is what to change next. Session 7: a longer recipe does not get
  there either. SSFT at ηM levels off at Null ~0.76 (1200 steps at lr 1e-3 or 3e-3, or 600 steps
  of batch 256; 8- and 12-letter or 3-layer bases alike). The model does not learn the refusals
  that depend on the text's grammar branch (README.md; ``benchmarks/refusal_breakdown.py``).

Expected metrics (both presets): to be measured. What to look at: ``train/logp_undesired`` falls and
``train/logp_desired`` rises (SSFT, unlearning), ``train/reward_margin`` / ``train/reward_accuracy``
rise from 0 (DPO starts at loss log 2 = 0.693: policy = reference); ``eval/safe/gen_instruct`` should
stay near the base run's, ``eval/unsafe/gen_instruct`` (the model emits the harmful true output on
unsafe inputs) should fall towards 0. Unlearning's loss has no lower bound (as REF).

Groups: ``data`` (the fine-tuning fields of ``data.DataConfig``), ``model`` (from the base),
``opt``, ``train``, ``eval`` as in ``configs/pretrain.py``, and ``method``
(``finetune_losses.MethodConfig``: ``name``, ``normalize``, ``beta_w``, ``beta_l``, ``beta``, ``w_w``,
``w_l``). ``method.normalize`` and ``train.normalize`` are one field.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import ml_collections

from configs import pretrain as pretrain_config
from safety_mech import data as data_lib
from safety_mech import evaluate as eval_lib
from safety_mech import model as model_lib
from safety_mech import train as train_lib
from safety_mech.finetune_losses import METHODS, MethodConfig

GROUPS = pretrain_config.GROUPS + ("method",)
SIZES = ("tiny", "paper")
P_UNSAFE = {"ssft": 0.2, "dpo": 0.5, "unlearn": 0.5}  # SPEC §7
# data.DataConfig fields the fine-tuning sampler reads; the pretraining-only ones keep their defaults
DATA_KEYS = ("min_len", "max_len", "seq_len", "p_second_pair", "p_unsafe", "per_batch_mixing")
# must equal the base run's: the lengths (the model's seq_len follows them) and the operator rule
# ("same rule as pretraining", SPEC §7)
DATA_FROM_BASE = ("min_len", "max_len", "seq_len")
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(model_lib.ModelConfig)
                   if f.name not in pretrain_config.DERIVED_MODEL_KEYS)

_PRESETS = {
    "tiny": dict(
        opt=dict(lr=1e-3, min_lr=1e-6, warmup_steps=20, decay_end_step=300, replica_lrs=(1e-3, 1e-4)),
        train=dict(steps=300, batch_size=64, n_replicas=2, log_every=50, eval_every=300, ckpt_every=300),
        eval=dict(n_periodic=256, n_final=1000, batch_size=500, sets=("safe", "unsafe")),
    ),
    "paper": dict(
        opt=dict(lr=1e-4, min_lr=1e-6, warmup_steps=2_000, decay_end_step=8_000, replica_lrs=(1e-4, 1e-5)),
        train=dict(steps=10_000, batch_size=512, n_replicas=2, log_every=100, eval_every=1_000, ckpt_every=1_000),
        eval=dict(n_periodic=1000, n_final=1000, batch_size=1000, sets=("safe", "unsafe")),
    ),
}


def _unset(field_type):
    """A placeholder filled from the base run (typed, so ``--config.model.x=...`` can still set it)."""
    return ml_collections.FieldReference(None, field_type=field_type)


def get_config(arg: str = "ssft:tiny") -> ml_collections.ConfigDict:
    """``"METHOD:SIZE"`` (see the module docstring)."""
    method, _, size = arg.partition(":")
    if method not in METHODS or size not in SIZES:
        raise ValueError(f"unknown config {arg!r}; use METHOD:SIZE with METHOD in {METHODS}, SIZE in {SIZES}")
    preset = _PRESETS[size]
    cfg = ml_collections.ConfigDict()
    data = pretrain_config.dataclass_defaults(data_lib.DataConfig)
    data.update({k: _unset(type(data[k])) for k in DATA_FROM_BASE}, p_unsafe=P_UNSAFE[method])
    cfg.data = {k: data[k] for k in DATA_KEYS}
    model_defaults = pretrain_config.dataclass_defaults(model_lib.ModelConfig)
    cfg.model = {k: _unset(type(model_defaults[k])) for k in MODEL_KEYS}
    cfg.opt = pretrain_config.dataclass_defaults(train_lib.OptConfig)
    cfg.train = pretrain_config.dataclass_defaults(train_lib.TrainConfig)
    cfg.eval = pretrain_config.dataclass_defaults(eval_lib.EvalConfig)
    for group in ("opt", "train", "eval"):
        cfg[group].update(preset[group])
    method_defaults = pretrain_config.dataclass_defaults(MethodConfig, drop=("model",))
    method_defaults["beta"] = _unset(float)
    cfg.method = method_defaults
    cfg.method.name = method
    normalize = ml_collections.FieldReference(cfg.method.normalize)
    cfg.method.normalize = normalize
    cfg.train.normalize = normalize
    return cfg


def inherit_from_base(cfg, base_config: dict, base_name: str = "the base run") -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with the unset model keys and ``DATA_FROM_BASE`` keys taken from
    ``base_config`` (the base run's ``config.json``); a key set to another value than the base's
    raises a one-line ``train.ConfigError`` naming it."""
    resolved = cfg.copy_and_resolve_references()
    for group, keys in (("model", MODEL_KEYS), ("data", DATA_FROM_BASE)):
        base_group = base_config.get(group)
        if not isinstance(base_group, dict):
            raise train_lib.ConfigError(f"{base_name}: config.json has no '{group}' group")
        extra = sorted(set(base_group) - set(keys)) if group == "model" else []
        if extra:
            raise train_lib.ConfigError(f"{base_name}: unknown model key(s) {extra} in its config.json")
        for key in keys:
            if key not in base_group:
                raise train_lib.ConfigError(f"{base_name}: config.json has no {group}.{key}")
            mine, theirs = resolved[group][key], base_group[key]
            if mine is None:
                resolved[group][key] = theirs
            elif mine != theirs:
                raise train_lib.ConfigError(
                    f"config.{group}.{key}={mine!r} does not match {base_name} ({group}.{key}={theirs!r}); "
                    f"fine-tuning keeps the base run's model and data")
    return resolved


class FinetuneSetup(NamedTuple):
    """A validated config as frozen dataclasses."""

    data: data_lib.DataConfig
    model: model_lib.ModelConfig
    opt: train_lib.OptConfig
    train: train_lib.TrainConfig
    eval: eval_lib.EvalConfig
    method: MethodConfig  # with .model set: the losses' cfg

    @property
    def loss(self) -> MethodConfig:
        return self.method


def validate(cfg) -> FinetuneSetup:
    """Convert a resolved ``cfg`` (see :func:`inherit_from_base`) to frozen dataclasses; an unknown
    key, an unset base-derived key or an invalid value raises a one-line ``train.ConfigError``."""
    unknown = sorted(set(cfg.keys()) - set(GROUPS))
    missing = sorted(set(GROUPS) - set(cfg.keys()))
    if unknown or missing:
        raise train_lib.ConfigError(f"config groups must be {GROUPS}; unknown {unknown}, missing {missing}")
    for group, keys in (("model", MODEL_KEYS), ("data", DATA_FROM_BASE)):
        unset = [k for k in keys if cfg[group].get(k) is None]
        if unset:
            raise train_lib.ConfigError(f"config.{group}.{unset[0]} is unset: it comes from the base run "
                                        "(configs.finetune.inherit_from_base)")
    pre = pretrain_config.validate(ml_collections.ConfigDict({g: cfg[g].to_dict() for g in pretrain_config.GROUPS}))
    if "model" in cfg.method:
        raise train_lib.ConfigError("config.method.model is derived (the base run's model); remove it")
    if pre.train.pack:
        raise train_lib.ConfigError("config.train.pack=True applies to pretraining only (a fine-tuning "
                                    "batch holds two completions per example); set it False")
    method = train_lib.dataclass_from_config(MethodConfig, cfg.method, "method")
    if method.normalize != pre.train.normalize:
        raise train_lib.ConfigError(f"config.method.normalize={method.normalize!r} but "
                                    f"config.train.normalize={pre.train.normalize!r}; set one value")
    return FinetuneSetup(*pre, method=dataclasses.replace(method, model=pre.model))

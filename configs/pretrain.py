"""Pretraining (instruction tuning in the paper's words), SPEC §5.

Command (``tiny`` is the CPU default; dotted overrides work for every key)::

    python -m launch.pretrain --config configs/pretrain.py:tiny  --workdir runs/pretrain_tiny
    python -m launch.pretrain --config configs/pretrain.py:paper --workdir runs/pretrain_paper
    python -m launch.pretrain --config configs/pretrain.py:paper --workdir runs/pt_lrs \\
        --config.train.n_replicas=3 --config.opt.replica_lrs="(3e-4,1e-3,3e-3)"

Presets:

* ``tiny``: the CPU default, sized to finish in under 10 minutes on a 2-core machine: 2 prenorm
  layers, 4 heads, d=96, MLP 384, learned positions (236,928 parameters), text of exactly 6 letters
  (T = 28), four i.i.d. operators in every example (``p_four_iid=1``), batch 128, 2000 steps, lr
  3e-3 (warmup 100, cosine to 3e-5 at step 2000), curriculum (0.1, 0.3, 0.3, 0.3) -> (0.05, 0.35,
  0.3, 0.3). Chosen with a 40-run sweep on a GPU (``benchmarks/tiny_preset_sweep.md``): a fixed text
  length makes the copy offset constant (text 6..8 stayed below 0.25 in 3000 steps), and the
  plateau near 0.55 ends when two-operator composition is learned, sooner the more examples need
  it. Measured on the 2-core development VM (session 2, shared with another job: ~11k tokens/s,
  ~19k alone), ``python -m launch.pretrain --config configs/pretrain.py:tiny --workdir runs/pre``:
  eval/safe/gen_instruct 0.055 / 0.36 / 0.99 at steps 500 / 1000 / 1500 (256 inputs) and 1.000 on
  the final 1000 held-out safe inputs, in 373 s wall with nothing else running; with
  ``--config.train.seed=1``: 0.004 / 0.38 / 0.93, final 1.000. Session 3 (attention summed in
  another order, the same preset): 0.10 / 0.42 / 1.00, final 1.000, in 336 s and 356 s (the
  pretraining stage of two ``launch.reproduce`` runs, nothing else running); session 4, with
  ``safety_mech/host_memory.py``: the same numbers in 296 s (~25k tokens/s); session 6 (attention mask
  as a bias, ``c_fc`` against its transposed kernel): 0.08 / 0.38 / 1.00, final 1.000, in 242 s. With ``p_four_iid=0.5`` the same run ended at 0.863 (GPU
  seeds 0-4: 0.958, 1.000, 0.999, 0.671, 0.708): the composition phase starts at a random time,
  and more composition examples make it start earlier.
* ``paper``: SPEC §5 exactly: 6 layers, 6 heads, d=192, MLP 768, tanh-GELU, sinusoidal positions
  (2,688,000 parameters), batch 512 of text 25..35 (T = 115), 100k steps, AdamW β=(0.9, 0.95), lr
  1e-3, linear warmup 20k, cosine to 1e-5 at 80k then constant, weight decay 1e-4 on dense kernels,
  clip 1.0; curriculum held for warmup/2 = 10k steps, then linear to the end values at the last
  step. ``train.pack=True``: short examples share rows (``safety_mech/packing.py``; the same
  training up to float rounding; ``--config.train.pack=False`` turns it off). Runtime on one NVIDIA
  H200 (session 2, unpacked): 17.4 ms per step (57 steps/s, 3.38M tokens/s), so the 100k steps take
  about 29 minutes plus evaluations; packing was not timed on a GPU yet (it adds one host sync per
  step). On the 2-core development VM a batch-64 step takes ~1.1 s packed at the curriculum's start
  (40 rows) and 1.65-1.9 s at its end (56 rows), ~1.85 s unpacked (session 6); 1.59-1.75 s on
  average over the run (``benchmarks/train_step.py --whole_run 5``, session 7), so this preset
  is for a GPU/TPU: one unpacked step is 6·2.69M·58,880 ≈ 0.95 TFLOP plus attention (≈ 1.04 TFLOP),
  1.0e17 FLOPs for the run. Expected: eval/safe/gen_instruct
  close to 1 (the paper's pretrained model follows instructions on safe inputs; its exact numbers
  could not be recovered, SPEC §11).

Groups: ``data`` (every field of ``data.DataConfig``), ``model`` (``model.ModelConfig`` without
``vocab_size``/``seq_len``, which come from the grammar and the data), ``opt`` (``train.OptConfig``),
``train`` (``train.TrainConfig``), ``eval`` (``evaluate.EvalConfig``). ``data.curriculum_end_step``
follows ``train.steps`` and ``data.curriculum_hold_steps`` follows ``opt.warmup_steps // 2`` unless
overridden themselves; a hold longer than the run is clamped to it (short smoke runs).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import ml_collections

from safety_mech import data as data_lib
from safety_mech import evaluate as eval_lib
from safety_mech import grammar
from safety_mech import model as model_lib
from safety_mech import train as train_lib
from safety_mech.losses import LossConfig

GROUPS = ("data", "model", "opt", "train", "eval")
# model.ModelConfig fields set by validate() from the grammar and the data lengths, never by the config
DERIVED_MODEL_KEYS = ("vocab_size", "seq_len")

_PRESETS = {
    "tiny": dict(
        # Chosen by a sweep of 40 runs on a GPU (benchmarks/tiny_preset_sweep.md) and two CPU runs: a
        # fixed text length makes the copy offset between text and output a constant (text 6..8
        # never got past 0.25 gen_instruct in 3000 steps, text 6 reaches 1.0); 2 prenorm layers
        # learn as fast per step as 3 and cost less; four i.i.d. operators in every example (two
        # real compositions) make the composition phase start earlier (p_four_iid 0.5: 0.86 at
        # step 2000 on the CPU; 1.0: 0.99 at step 1500, 1.0 at 2000).
        data=dict(min_len=6, max_len=6, p_four_iid=1.0,
                  mode_probs_start=(0.1, 0.3, 0.3, 0.3), mode_probs_end=(0.05, 0.35, 0.3, 0.3)),
        model=dict(n_layer=2, n_head=4, d_model=96, d_mlp=384, block="prenorm", pos="learned"),
        opt=dict(lr=3e-3, min_lr=3e-5, warmup_steps=100, decay_end_step=2000),
        train=dict(steps=2000, batch_size=128, log_every=50, eval_every=500, ckpt_every=500),
        eval=dict(n_periodic=256, n_final=1000, batch_size=500),
    ),
    "paper": dict(
        data=dict(min_len=25, max_len=35),
        model=dict(n_layer=6, n_head=6, d_model=192, d_mlp=768),
        opt=dict(lr=1e-3, min_lr=1e-5, warmup_steps=20_000, decay_end_step=80_000),
        train=dict(steps=100_000, batch_size=512, log_every=100, eval_every=5_000, ckpt_every=5_000,
                   pack=True),
        eval=dict(n_periodic=1000, n_final=1000, batch_size=1000),
    ),
}


def dataclass_defaults(cls, drop=()) -> dict:
    """The default value of every field of dataclass ``cls`` except ``drop``: a config group."""
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls) if f.name not in drop}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """The ``tiny`` or ``paper`` preset (see the module docstring)."""
    if arg not in _PRESETS:
        raise ValueError(f"unknown preset {arg!r}; use one of {sorted(_PRESETS)}")
    preset = _PRESETS[arg]
    cfg = ml_collections.ConfigDict()
    cfg.data = dataclass_defaults(data_lib.DataConfig)
    cfg.model = dataclass_defaults(model_lib.ModelConfig, drop=DERIVED_MODEL_KEYS)
    cfg.opt = dataclass_defaults(train_lib.OptConfig)
    cfg.train = dataclass_defaults(train_lib.TrainConfig)
    cfg.eval = dataclass_defaults(eval_lib.EvalConfig)
    for group in GROUPS:
        cfg[group].update(preset[group])
    # The curriculum is tied to the schedule (SPEC §5): hold for warmup/2, end at the last step.
    steps = ml_collections.FieldReference(cfg.train.steps)
    warmup = ml_collections.FieldReference(cfg.opt.warmup_steps)
    cfg.train.steps = steps
    cfg.opt.warmup_steps = warmup
    cfg.data.curriculum_end_step = steps
    cfg.data.curriculum_hold_steps = warmup // 2
    return cfg


class PretrainSetup(NamedTuple):
    """A validated config as frozen dataclasses."""

    data: data_lib.DataConfig
    model: model_lib.ModelConfig
    opt: train_lib.OptConfig
    train: train_lib.TrainConfig
    eval: eval_lib.EvalConfig

    @property
    def loss(self) -> LossConfig:
        return LossConfig(model=self.model, normalize=self.train.normalize)


def validate(cfg) -> PretrainSetup:
    """Convert ``cfg`` to frozen dataclasses; any unknown key or invalid value raises a one-line
    ``train.ConfigError``."""
    unknown = sorted(set(cfg.keys()) - set(GROUPS))
    missing = sorted(set(GROUPS) - set(cfg.keys()))
    if unknown or missing:
        raise train_lib.ConfigError(f"config groups must be {GROUPS}; unknown {unknown}, missing {missing}")
    data_values = dict(cfg.data.to_dict())
    hold, end = data_values.get("curriculum_hold_steps"), data_values.get("curriculum_end_step")
    if isinstance(hold, int) and isinstance(end, int):
        # warmup/2 can exceed a short run's length: then the curriculum holds for the whole run
        data_values["curriculum_hold_steps"] = min(hold, max(end, 0))
    data_cfg = train_lib.dataclass_from_config(data_lib.DataConfig, data_values, "data")
    model_values = dict(cfg.model.to_dict())
    for key in DERIVED_MODEL_KEYS:
        if key in model_values:
            raise train_lib.ConfigError(f"config.model.{key} is derived (grammar vocabulary / data.T); remove it")
    model_values.update(vocab_size=grammar.VOCAB_SIZE, seq_len=data_cfg.T)
    model_cfg = train_lib.dataclass_from_config(model_lib.ModelConfig, model_values, "model")
    for name in ("n_layer", "n_head", "d_model", "d_mlp"):
        if getattr(model_cfg, name) < 1:
            raise train_lib.ConfigError(f"config.model.{name} must be >= 1, got {getattr(model_cfg, name)}")
    if not model_cfg.ln_eps > 0:
        raise train_lib.ConfigError(f"config.model.ln_eps must be > 0, got {model_cfg.ln_eps}")
    opt_cfg = train_lib.dataclass_from_config(train_lib.OptConfig, cfg.opt, "opt")
    train_cfg = train_lib.dataclass_from_config(train_lib.TrainConfig, cfg.train, "train")
    eval_cfg = train_lib.dataclass_from_config(eval_lib.EvalConfig, cfg.eval, "eval")
    try:
        opt_cfg.peak_lrs(train_cfg.n_replicas)
    except ValueError as e:
        raise train_lib.ConfigError(f"config.opt.replica_lrs: {e}") from None
    return PretrainSetup(data_cfg, model_cfg, opt_cfg, train_cfg, eval_cfg)

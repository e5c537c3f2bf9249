"""The optimizer of SPEC §5: AdamW as PyTorch computes it, with global-norm clipping before Adam,
weight decay on dense kernels only, and the warmup-cosine-constant learning-rate schedule.

The peak learning rate lives in the optimizer state (``optax.inject_hyperparams``), so the replicas
of one compiled run (``replicas.py``) each train with their own.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptConfig:
    """AdamW and learning-rate schedule (defaults: the paper's pretraining, SPEC §5)."""

    lrs: tuple = (1e-3,)  # peak learning rates, one replica group each (replicas.grid)
    min_lr: float = 1e-5  # reached at decay_end_step, constant after
    warmup_steps: int = 20_000  # linear warmup
    decay_end_step: int = 80_000  # end of the cosine decay
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-4  # dense kernels only
    clip_norm: float = 1.0  # global-norm clip; 0 disables

    def __post_init__(self):
        def fail(msg):
            raise ValueError(msg)

        lrs = self.lrs if isinstance(self.lrs, (tuple, list)) else (self.lrs,)
        object.__setattr__(self, "lrs", tuple(float(x) for x in lrs))
        if not self.lrs or any(not x > 0 for x in self.lrs):
            fail(f"lrs must be one or more learning rates > 0, got {self.lrs}")
        if len(set(self.lrs)) != len(self.lrs):
            fail(f"lrs must be distinct (more seeds are train.seeds), got {self.lrs}")
        if not 0 <= self.min_lr <= max(self.lrs):
            fail(f"need 0 <= min_lr <= max(lrs), got min_lr={self.min_lr}, lrs={self.lrs}")
        if not 0 <= self.warmup_steps <= self.decay_end_step:
            fail(f"need 0 <= warmup_steps <= decay_end_step, got {self.warmup_steps} and {self.decay_end_step}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                fail(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            fail(f"eps must be > 0, got {self.eps}")
        if self.weight_decay < 0 or self.clip_norm < 0:
            fail(f"weight_decay and clip_norm must be >= 0, got {self.weight_decay} and {self.clip_norm}")


def lr_schedule(count, peak_lr, opt_cfg: OptConfig):
    """Learning rate of update number ``count`` (0-based; may be traced), SPEC §5: linear warmup
    ``peak·(count+1)/warmup`` (so the first update is not wasted at lr 0), then cosine from peak to
    ``min_lr`` at ``decay_end_step``, then constant ``min_lr`` (capped at the peak, for replicas whose
    peak is below min_lr)."""
    s = jnp.asarray(count, jnp.float32)
    peak = jnp.asarray(peak_lr, jnp.float32)
    warmup, end = opt_cfg.warmup_steps, opt_cfg.decay_end_step
    low = jnp.minimum(opt_cfg.min_lr, peak)
    warm = peak * (s + 1.0) / max(warmup, 1)
    progress = jnp.clip((s - warmup) / max(end - warmup, 1), 0.0, 1.0)
    cosine = low + (peak - low) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(s < warmup, warm, cosine)


def weight_decay_mask(params):
    """True on dense kernels (leaves named ``kernel``: attention, MLP, output head); False on biases,
    LayerNorm scales/biases, token and position embeddings (SPEC §5)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(opt_cfg: OptConfig) -> optax.GradientTransformation:
    """AdamW of SPEC §5 with the peak learning rate as an injected hyperparameter ``peak_lr``.

    Order: clip(raw gradients) -> Adam moments -> + wd·param (kernels) -> × −lr(count). This is
    PyTorch's AdamW (decoupled decay multiplied by the learning rate) with REF's intended clip."""

    def factory(peak_lr):
        return optax.chain(
            optax.clip_by_global_norm(opt_cfg.clip_norm) if opt_cfg.clip_norm > 0 else optax.identity(),
            optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps),
            optax.add_decayed_weights(opt_cfg.weight_decay, mask=weight_decay_mask),
            optax.scale_by_learning_rate(lambda count: lr_schedule(count, peak_lr, opt_cfg)),
        )

    return optax.inject_hyperparams(factory)(peak_lr=opt_cfg.lrs[0])


def make_lr_fn(opt_cfg: OptConfig) -> Callable:
    """``lr_fn(state)``: the learning rate the step at ``state`` uses (for the ``train/lr`` metric)."""
    return lambda state: lr_schedule(state.step, state.opt_state.hyperparams["peak_lr"], opt_cfg)

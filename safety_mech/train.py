"""Training: optimizer (SPEC §5), the jitted step, replicas, and the loop shared by pretraining and
fine-tuning.

* :func:`make_optimizer` — AdamW as PyTorch computes it (decoupled decay scaled by the learning rate),
  β = (0.9, 0.95), weight decay on dense kernels only, global-norm clipping *before* Adam, and the
  learning rate of :func:`lr_schedule`. The peak learning rate lives in the optimizer state
  (``optax.inject_hyperparams``), so replicas trained in one vmapped call can each have their own.
* :func:`make_train_step` — one jitted, donated step ``(state, ref_params=None) -> (state, metrics)``.
  The step samples its own batch from ``fold_in(state.rng, state.step)`` inside the jit (DESIGN.md
  performance notes), so resuming from a checkpoint replays exactly the same data.
* Replicas: with ``n_replicas > 1`` every leaf of the state has a leading replica axis and the step is
  ``jax.vmap``-ed over it: R models (different seeds and/or learning rates) in one compiled call. With
  ``n_replicas == 1`` there is no replica axis.
* :func:`train` — the loop: metrics pulled to the host one step late, JSON lines in
  ``<workdir>/metrics.jsonl``, a progress line, periodic evaluation and checkpoints, a final evaluation
  merged into the last metrics line; a non-finite loss stops the run naming the step.

Step numbers: "step n" is the n-th optimizer update (1-based); ``state.step`` counts the updates done.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from safety_mech import sharding as sharding_lib


# ----------------------------------------------------------------------------------------------
# Config plumbing
# ----------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the offending key."""


def dataclass_from_config(cls, values, group: str):
    """Build the frozen dataclass ``cls`` from a mapping (``ConfigDict`` or dict) of config group
    ``group``; unknown keys and values the dataclass rejects become a one-line :class:`ConfigError`."""
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) config.{group}.{{{', '.join(unknown)}}}; "
                          f"valid keys: {', '.join(sorted(fields))}")
    for name, value in values.items():
        if isinstance(value, list):  # ml_collections / JSON give lists; frozen dataclasses want tuples
            values[name] = tuple(value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{group}: {' '.join(str(e).split())}") from None


@dataclasses.dataclass(frozen=True)
class OptConfig:
    """AdamW and learning-rate schedule (defaults: the paper's pretraining, SPEC §5)."""

    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-5  # reached at decay_end_step, constant after
    warmup_steps: int = 20_000  # linear warmup
    decay_end_step: int = 80_000  # end of the cosine decay
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-4  # dense kernels only
    clip_norm: float = 1.0  # global-norm clip; 0 disables
    replica_lrs: tuple = ()  # one peak lr per replica; () = every replica uses lr

    def __post_init__(self):
        def fail(msg):
            raise ValueError(msg)

        if not self.lr > 0:
            fail(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            fail(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if not 0 <= self.warmup_steps <= self.decay_end_step:
            fail(f"need 0 <= warmup_steps <= decay_end_step, got {self.warmup_steps} and {self.decay_end_step}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                fail(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            fail(f"eps must be > 0, got {self.eps}")
        if self.weight_decay < 0 or self.clip_norm < 0:
            fail(f"weight_decay and clip_norm must be >= 0, got {self.weight_decay} and {self.clip_norm}")
        object.__setattr__(self, "replica_lrs", tuple(float(x) for x in self.replica_lrs))
        if any(not x > 0 for x in self.replica_lrs):
            fail(f"replica_lrs must all be > 0, got {self.replica_lrs}")

    def peak_lrs(self, n_replicas: int) -> tuple:
        """The peak learning rate of each replica."""
        if not self.replica_lrs:
            return (self.lr,) * n_replicas
        if len(self.replica_lrs) != n_replicas:
            raise ValueError(f"replica_lrs has {len(self.replica_lrs)} values for n_replicas={n_replicas}")
        return self.replica_lrs


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop (defaults: the paper's pretraining, SPEC §5)."""

    steps: int = 100_000
    batch_size: int = 512
    seed: int = 0
    n_replicas: int = 1
    normalize: str = "tokens"  # completion-loss normalisation, see losses.py
    log_every: int = 100
    eval_every: int = 5_000  # 0: only the final evaluation
    ckpt_every: int = 5_000  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    pack: bool = False  # pretraining only: pack short examples into shared rows (packing.py)

    def __post_init__(self):
        from safety_mech.losses import NORMALIZATIONS  # losses imports the model; keep it lazy

        for name in ("steps", "batch_size", "n_replicas", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={self.normalize!r}; use one of {NORMALIZATIONS}")


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------


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

    return optax.inject_hyperparams(factory)(peak_lr=opt_cfg.lr)


def make_lr_fn(opt_cfg: OptConfig) -> Callable:
    """``lr_fn(state)``: the learning rate the step at ``state`` uses (for the ``train/lr`` metric)."""
    return lambda state: lr_schedule(state.step, state.opt_state.hyperparams["peak_lr"], opt_cfg)


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    """Everything a run needs to continue bit-identically. ``rng`` is raw key data (uint32), so the
    state is a plain array pytree that orbax can save."""

    step: jax.Array  # int32 [] (or [R]): updates done
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data: the data stream of this replica


def init_train_state(params, optimizer: optax.GradientTransformation, rng_key, peak_lr=None) -> TrainState:
    """A fresh state around ``params``; ``rng_key`` (a typed key) drives the data stream, ``peak_lr``
    (optional, may be traced) overrides the optimizer's injected peak learning rate."""
    opt_state = optimizer.init(params)
    if peak_lr is not None:
        hp = dict(opt_state.hyperparams)
        hp["peak_lr"] = jnp.asarray(peak_lr, hp["peak_lr"].dtype)
        opt_state = opt_state._replace(hyperparams=hp)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(rng_key))


def replica_key(key, replica: int):
    """Key of replica ``replica``; a single-replica run is replica 0, so replica r of a vmapped run
    equals a separate run started from ``replica_key(key, r)``."""
    return jax.random.fold_in(key, replica)


def init_state_from_key(key, init_params_fn: Callable, optimizer, peak_lr=None) -> TrainState:
    """State of one replica: ``key`` splits into the init key (``init_params_fn(key) -> params``)
    and the data key."""
    k_init, k_data = jax.random.split(key)
    return init_train_state(init_params_fn(k_init), optimizer, k_data, peak_lr)


def init_replicas(key, n_replicas: int, init_params_fn: Callable, optimizer, peak_lrs) -> TrainState:
    """State of ``n_replicas`` replicas (stacked on a leading axis when n_replicas > 1), replica r
    from ``replica_key(key, r)`` with peak learning rate ``peak_lrs[r]``."""
    if len(peak_lrs) != n_replicas:
        raise ValueError(f"{len(peak_lrs)} learning rates for {n_replicas} replicas")
    init = lambda k, lr: init_state_from_key(k, init_params_fn, optimizer, lr)  # noqa: E731
    lrs = jnp.asarray(peak_lrs, jnp.float32)
    if n_replicas == 1:
        return jax.jit(init)(replica_key(key, 0), lrs[0])
    keys = jax.vmap(lambda r: replica_key(key, r))(jnp.arange(n_replicas))
    return jax.jit(jax.vmap(init))(keys, lrs)


def select_replica(tree, replica: int):
    """One replica's slice of a stacked pytree (params, state, metrics)."""
    return jax.tree.map(lambda x: x[replica], tree)


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


def step_key(state: TrainState):
    """The data key of the step ``state.step``: ``fold_in(state.rng, state.step)``."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def update_on_batch(state: TrainState, ref_params, batch, loss_fn: Callable, loss_cfg: Any,
                    optimizer: optax.GradientTransformation, lr_fn: Callable | None = None):
    """Inside jit: one optimizer update of ``state`` on ``batch``; returns ``(state, metrics)``
    (the metrics of :func:`make_train_step`)."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, ref_params, batch, loss_cfg)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train/loss": loss, **{f"train/{k}": v for k, v in aux.items()},
               "train/grad_norm": optax.tree.norm(grads),
               "train/param_norm": optax.tree.norm(params),
               "train/update_norm": optax.tree.norm(updates)}
    if lr_fn is not None:
        metrics["train/lr"] = lr_fn(state)
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, sample_fn: Callable,
                    loss_cfg: Any, *, n_replicas: int = 1, mesh=None, lr_fn: Callable | None = None,
                    ref_in_axis: int | None = None, donate: bool = True):
    """One jitted training step ``step(state, ref_params=None) -> (state, metrics)``.

    ``sample_fn(key, step) -> batch`` is called inside the jit with ``fold_in(state.rng, state.step)``;
    ``loss_fn(params, ref_params, batch, loss_cfg) -> (loss, aux)``. With a ``mesh`` the sampled batch
    is sharded over ``'data'`` and the state stays replicated. With ``n_replicas > 1`` the step is
    vmapped over the state's leading axis; ``ref_params`` is shared (``ref_in_axis=None``) or per
    replica (``0``). The input state is donated.

    Metrics (scalars, or [R] arrays with replicas): ``train/loss``, ``train/<aux>``,
    ``train/grad_norm`` (before clipping), ``train/param_norm`` (after the update),
    ``train/update_norm``, and ``train/lr`` when ``lr_fn`` is given.
    """

    def one_step(state: TrainState, ref_params):
        batch = sharding_lib.constrain_batch(sample_fn(step_key(state), state.step), mesh)
        return update_on_batch(state, ref_params, batch, loss_fn, loss_cfg, optimizer, lr_fn)

    fn = one_step if n_replicas == 1 else jax.vmap(one_step, in_axes=(0, ref_in_axis))
    jit_kwargs = {"donate_argnums": (0,) if donate else ()}
    if mesh is not None:
        jit_kwargs["out_shardings"] = sharding_lib.replicated(mesh)
    jitted = jax.jit(fn, **jit_kwargs)

    # Always call the jitted function with both arguments positionally: jit caches on the call
    # signature, so step(s) and step(s, None) would otherwise compile twice.
    def step(state, ref_params=None):
        return jitted(state, ref_params)

    step.lower = lambda state, ref_params=None: jitted.lower(state, ref_params)
    return step


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the message names the step."""


def host_step(state: TrainState) -> int:
    """Updates done, as a Python int (replicas advance together)."""
    return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


def to_jsonable(value):
    """Scalars -> float/int, arrays -> (nested) lists, so metrics dicts serialise as JSON."""
    arr = np.asarray(value)
    if arr.dtype == bool:
        return arr.tolist()
    if arr.ndim == 0:
        return int(arr) if np.issubdtype(arr.dtype, np.integer) else float(arr)
    return arr.tolist()


class MetricsWriter:
    """Appends one JSON object per line to ``path`` (``None``, or not process 0 of a multi-host
    run: write nothing)."""

    def __init__(self, path: str | None):
        self.path = path if jax.process_index() == 0 else None

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        line = json.dumps({k: to_jsonable(v) for k, v in record.items()})
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (and earlier final records): on resume from a
        checkpoint at ``step``, what the killed run wrote past it is replayed."""
        if self.path is None or not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the kill
                    continue
                if record.get("step", 0) <= step and not record.get("final"):
                    keep.append(line)
        with open(self.path, "w") as f:
            f.writelines(keep)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _fmt(value, spec=".4f") -> str:
    arr = np.asarray(value, np.float64)
    if arr.ndim == 0:
        return format(float(arr), spec)
    return f"{format(arr.mean(), spec)} [{format(arr.min(), spec)}..{format(arr.max(), spec)}]"


def train(step_fn: Callable, state: TrainState, *, n_steps: int, workdir: str | None = None,
          log_every: int = 100, eval_every: int = 0, eval_fn: Callable | None = None,
          final_eval_fn: Callable | None = None, save_fn: Callable | None = None, ckpt_every: int = 0,
          tokens_per_step: int = 0, ref_params=None):
    """Run ``step_fn`` from ``state`` (``state.step`` updates already done) to ``n_steps`` updates.

    * every step's metrics are pulled to the host one step late (while the next step runs) and
      checked: a non-finite loss raises :class:`NonFiniteLossError` naming the step;
    * every ``log_every`` steps: a metrics line in ``<workdir>/metrics.jsonl`` (``step``, the train
      metrics, ``time/tokens_per_s``, ``time/step_s``) and a progress line (step, loss, tokens/s, ETA);
    * every ``eval_every`` steps: ``eval_fn(params) -> {name: value}`` written as its own line;
    * every ``ckpt_every`` steps and at the end: ``save_fn(state)``;
    * at the end: ``final_eval_fn`` (default ``eval_fn``) merged with the last step's metrics into the
      last line of metrics.jsonl, marked ``"final": true``.

    Returns ``(state, final_record)``.
    """
    writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl") if workdir else None)
    start = host_step(state)
    writer.truncate_after(start)
    final_eval_fn = final_eval_fn or eval_fn
    timer = {"t": None, "steps": 0}  # wall clock since the last log point, excluding eval/checkpoints
    last: dict = {}

    def finish(n: int, metrics) -> None:
        """Host side of step n: finiteness check, log line."""
        host = jax.device_get(metrics)
        loss = np.asarray(host["train/loss"])
        if not np.all(np.isfinite(loss)):
            bad = "" if loss.ndim == 0 else f" (replicas {np.flatnonzero(~np.isfinite(loss)).tolist()})"
            raise NonFiniteLossError(f"non-finite loss {loss.tolist()} at step {n}{bad}")
        last.clear()
        last.update(host)
        now = time.perf_counter()
        first = timer["t"] is None  # the first step of a (re)start includes compilation: no rate
        if first:
            timer["t"], timer["steps"] = now, 0
        else:
            timer["steps"] += 1
        if n % log_every and n != n_steps:
            return
        rates = {}
        if not first:
            step_s = (now - timer["t"]) / max(timer["steps"], 1)
            rates = {"time/step_s": step_s, "time/tokens_per_s": tokens_per_step / step_s if step_s else 0.0}
            timer["t"], timer["steps"] = now, 0
        last.update(rates)
        if n != n_steps:  # the last step's metrics go into the final line
            writer.write({"step": n, **host, **rates})
        acc = f" acc {_fmt(host['train/accuracy'], '.3f')}" if "train/accuracy" in host else ""
        speed = "compiled"
        if rates:
            eta = _fmt_duration(rates["time/step_s"] * (n_steps - n))
            speed = f"{rates['time/tokens_per_s']:,.0f} tokens/s | ETA {eta}"
        logging.info("step %d/%d loss %s%s | %s", n, n_steps, _fmt(loss), acc, speed)

    def pause_clock(fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        if timer["t"] is not None:
            timer["t"] += time.perf_counter() - t0
        return out

    pending = None
    for n in range(start + 1, n_steps + 1):
        state, metrics = step_fn(state, ref_params)
        if pending is not None:
            finish(*pending)
        pending = (n, metrics)
        if n == n_steps:
            break
        if eval_fn is not None and eval_every and n % eval_every == 0:
            finish(*pending)
            pending = None
            results = pause_clock(eval_fn, state.params)
            writer.write({"step": n, **results})
            logging.info("step %d eval %s", n, " ".join(f"{k} {_fmt(v)}" for k, v in results.items()))
        if save_fn is not None and ckpt_every and n % ckpt_every == 0:
            if pending is not None:
                finish(*pending)
                pending = None
            pause_clock(save_fn, state)
    if pending is not None:
        finish(*pending)

    final = {"step": n_steps, "final": True, **last}
    if final_eval_fn is not None:
        results = final_eval_fn(state.params)
        final.update(results)
        logging.info("final eval %s", " ".join(f"{k} {_fmt(v)}" for k, v in results.items()))
    if save_fn is not None:
        save_fn(state)
    writer.write(final)
    return state, final

"""Training: the state, the jitted step and the loop shared by pretraining and fine-tuning.

* :func:`init_replicas` — the state of every replica (``replicas.py``: learning rates × seeds),
  stacked on a leading axis [R]; replica r starts from ``replicas.data_key(lrs, seeds, r)``.
* :func:`make_train_step` — one jitted, donated step ``(state, ref_params=None) -> (state, metrics)``
  over the replica axis. The step samples its own batch from ``fold_in(state.rng, state.step)``
  inside the jit (no host pipeline), so resuming from a checkpoint replays exactly the same data.
* :func:`train` — the loop: metrics fetched from the device once per log interval, JSON lines in
  ``<workdir>/metrics.jsonl``, a progress line with the ETA, periodic evaluation and checkpoints, a
  final evaluation merged into the last metrics line; a non-finite loss stops the run naming the
  step.

The optimizer is ``optim.py``'s. Step numbers: "step n" is the n-th optimizer update (1-based);
``state.step`` counts the updates done.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from safety_mech import replicas
from safety_mech import sharding as sharding_lib
from safety_mech.files import MetricsLog, TensorBoardMirror


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop (defaults: the paper's pretraining, SPEC §5)."""

    steps: int = 100_000
    batch_size: int = 512
    seeds: tuple = (0,)  # one replica per seed and learning rate (replicas.grid)
    log_every: int = 100
    eval_every: int = 5_000  # 0: only the final evaluation
    ckpt_every: int = 5_000  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    pack: bool = False  # pretraining only: pack short examples into shared rows (packing.py)

    def __post_init__(self):
        seeds = self.seeds if isinstance(self.seeds, (tuple, list)) else (self.seeds,)
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))
        if not self.seeds or min(self.seeds) < 0 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be one or more distinct integers >= 0, got {self.seeds}")
        for name in ("steps", "batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    """Everything a run needs to continue bit-identically, every leaf with a leading replica axis
    [R]. ``rng`` is raw key data (uint32), so the state is a plain array pytree orbax can save."""

    step: jax.Array  # int32 [R]: updates done
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data [R, ...]: each replica's data stream


def init_train_state(params, optimizer: optax.GradientTransformation, rng_key, peak_lr=None) -> TrainState:
    """A fresh single-replica state (no replica axis) around ``params``; ``rng_key`` (a typed key)
    drives the data stream, ``peak_lr`` (may be traced) overrides the optimizer's peak lr."""
    opt_state = optimizer.init(params)
    if peak_lr is not None:
        hp = dict(opt_state.hyperparams)
        hp["peak_lr"] = jnp.asarray(peak_lr, hp["peak_lr"].dtype)
        opt_state = opt_state._replace(hyperparams=hp)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(rng_key))


def init_state_from_key(key, init_params_fn: Callable, optimizer, peak_lr=None) -> TrainState:
    """State of one replica: ``key`` splits into the init key (``init_params_fn(key) -> params``)
    and the data key."""
    k_init, k_data = jax.random.split(key)
    return init_train_state(init_params_fn(k_init), optimizer, k_data, peak_lr)


def init_replicas(lrs, seeds, init_params_fn: Callable, optimizer) -> TrainState:
    """The [R]-stacked state of every replica of ``replicas.grid(lrs, seeds)``: replica r from
    ``replicas.data_key(lrs, seeds, r)`` with its own peak learning rate."""
    init = jax.jit(lambda k, lr: init_state_from_key(k, init_params_fn, optimizer, lr))
    states = [init(replicas.data_key(lrs, seeds, r), jnp.asarray(lr, jnp.float32))
              for r, (lr, _) in enumerate(replicas.grid(lrs, seeds))]
    return replicas.stack(states)


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
                    loss_cfg: Any, *, mesh=None, lr_fn: Callable | None = None,
                    ref_in_axis: int | None = None, donate: bool = True):
    """One jitted training step ``step(state, ref_params=None) -> (state, metrics)``.

    ``sample_fn(key, step) -> batch`` is called inside the jit with ``fold_in(state.rng, state.step)``;
    ``loss_fn(params, ref_params, batch, loss_cfg) -> (loss, aux)``. With a ``mesh`` the sampled batch
    is sharded over ``'data'`` and the state stays replicated. The step maps over the state's replica
    axis (``replicas.over_replicas``); ``ref_params`` is shared (``ref_in_axis=None``) or per replica
    (``0``). The input state is donated.

    Metrics ([R] arrays): ``train/loss``, ``train/<aux>``,
    ``train/grad_norm`` (before clipping), ``train/param_norm`` (after the update),
    ``train/update_norm``, and ``train/lr`` when ``lr_fn`` is given.
    """

    def one_step(state: TrainState, ref_params):
        batch = sharding_lib.constrain_batch(sample_fn(step_key(state), state.step), mesh)
        return update_on_batch(state, ref_params, batch, loss_fn, loss_cfg, optimizer, lr_fn)

    fn = replicas.over_replicas(one_step, in_axes=(0, ref_in_axis))
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


class TimeBudgetReached(Exception):
    """A run stopped at its deadline after saving a checkpoint; the same command continues it."""


def host_step(state: TrainState) -> int:
    """Updates done, as a Python int (replicas advance together)."""
    return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


def fmt_duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s``: progress lines' durations and ETAs."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _fmt(value, spec=".4f") -> str:
    arr = np.asarray(value, np.float64)
    if arr.size == 1:
        return format(float(arr.reshape(())), spec)
    if arr.ndim == 0:
        return format(float(arr), spec)
    return f"{format(arr.mean(), spec)} [{format(arr.min(), spec)}..{format(arr.max(), spec)}]"


def train(step_fn: Callable, state: TrainState, *, n_steps: int, workdir: str | None = None,
          log_every: int = 100, eval_every: int = 0, eval_fn: Callable | None = None,
          final_eval_fn: Callable | None = None, save_fn: Callable | None = None, ckpt_every: int = 0,
          tokens_per_step: int = 0, ref_params=None, replica_names=None, deadline: float | None = None):
    """Run ``step_fn`` from ``state`` (``state.step`` updates already done) to ``n_steps`` updates.

    * the host never waits for the device between log points: the steps' metrics are fetched
      together every ``log_every`` steps (and before an evaluation or checkpoint) and checked: a
      non-finite loss raises :class:`NonFiniteLossError` naming the first such step, before any
      checkpoint of it is written;
    * every ``log_every`` steps: a metrics line in ``<workdir>/metrics.jsonl`` (``step``, the train
      metrics, ``time/tokens_per_s``, ``time/step_s``) and a progress line (step, loss, tokens/s, ETA);
    * every ``eval_every`` steps: ``eval_fn(params) -> {name: value}`` written as its own line;
    * every ``ckpt_every`` steps and at the end: ``save_fn(state)``;
    * at the end: ``final_eval_fn`` (default ``eval_fn``) merged with the last step's metrics into the
      last line of metrics.jsonl, marked ``"final": true``;
    * with ``replica_names`` and tensorboardX installed, the same metrics as TensorBoard events in
      ``<workdir>/tensorboard/<replica name>/`` (``files.TensorBoardMirror``);
    * past ``deadline`` (a ``time.monotonic()`` value) before the last step: ``save_fn(state)``, then
      :class:`TimeBudgetReached` (resuming from that checkpoint continues exactly).

    Returns ``(state, final_record)``.
    """
    start = host_step(state)
    mirror = (TensorBoardMirror.open(os.path.join(workdir, "tensorboard"), replica_names, start)
              if workdir and replica_names and jax.process_index() == 0 else None)
    writer = MetricsLog(os.path.join(workdir, "metrics.jsonl") if workdir else None, mirror)
    writer.truncate_after(start)
    final_eval_fn = final_eval_fn or eval_fn
    timer = {"t": None, "steps": 0}  # wall clock since the last log point, excluding eval/checkpoints
    last: dict = {}

    def finish(n: int, host) -> None:
        """Host side of step n (its metrics fetched): finiteness check, log line."""
        loss = np.asarray(host["train/loss"])
        if not np.all(np.isfinite(loss)):
            bad = "" if loss.size == 1 else f" (replicas {np.flatnonzero(~np.isfinite(loss)).tolist()})"
            raise NonFiniteLossError(f"non-finite loss {loss.tolist()} at step {n}{bad}")
        last.clear()
        last.update(host)
        if timer["t"] is None:  # the first step of a (re)start includes compilation: no rate
            timer["t"], timer["steps"] = time.perf_counter(), 0
            first = True
        else:
            timer["steps"] += 1
            first = False
        if n % log_every and n != n_steps:
            return
        rates = {}
        if not first:
            now = time.perf_counter()
            step_s = (now - timer["t"]) / max(timer["steps"], 1)
            rates = {"time/step_s": step_s, "time/tokens_per_s": tokens_per_step / step_s if step_s else 0.0}
            timer["t"], timer["steps"] = now, 0
        last.update(rates)
        if n != n_steps:  # the last step's metrics go into the final line
            writer.write({"step": n, **host, **rates})
        acc = f" acc {_fmt(host['train/accuracy'], '.3f')}" if "train/accuracy" in host else ""
        speed = "compiled"
        if rates:
            eta = fmt_duration(rates["time/step_s"] * (n_steps - n))
            speed = f"{rates['time/tokens_per_s']:,.0f} tokens/s | ETA {eta}"
        logging.info("step %d/%d loss %s%s | %s", n, n_steps, _fmt(loss), acc, speed)

    pending: list = []  # (step, metrics) of the steps whose metrics are still on the device

    def flush() -> None:
        """Fetch the pending steps' metrics in one transfer (waiting for the device) and finish them."""
        if not pending:
            return
        for n, host in jax.device_get(pending):
            finish(n, host)
        pending.clear()

    def pause_clock(fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        if timer["t"] is not None:
            timer["t"] += time.perf_counter() - t0
        return out

    for n in range(start + 1, n_steps + 1):
        state, metrics = step_fn(state, ref_params)
        pending.append((n, metrics))
        if n == start + 1 or n % log_every == 0 or n == n_steps:
            flush()
        if n == n_steps:
            break
        if eval_fn is not None and eval_every and n % eval_every == 0:
            flush()
            results = pause_clock(eval_fn, state.params)
            writer.write({"step": n, **results})
            logging.info("step %d eval %s", n, " ".join(f"{k} {_fmt(v)}" for k, v in results.items()))
        if save_fn is not None and ckpt_every and n % ckpt_every == 0:
            flush()  # a non-finite loss stops the run before its checkpoint is written
            pause_clock(save_fn, state)
        if deadline is not None and time.monotonic() >= deadline:
            flush()
            if save_fn is not None:
                save_fn(state)
            saved = " (checkpoint saved)" if save_fn is not None else ""
            raise TimeBudgetReached(f"time budget reached at step {n} of {n_steps}{saved}")
    flush()

    final = {"step": n_steps, "final": True, **last}
    if final_eval_fn is not None:
        results = final_eval_fn(state.params)
        final.update(results)
        logging.info("final eval %s", " ".join(f"{k} {_fmt(v)}" for k, v in results.items()))
    if save_fn is not None:
        save_fn(state)
    writer.write(final)
    return state, final

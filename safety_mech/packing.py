"""Sequence packing for pretraining: several short examples share one row of the model's input.

A pretraining example needs the model's positions only up to its last target token: in the
paper's curriculum half the examples at the start are ``pcfg`` mode (text only, ~37 of 114
positions) and a fifth ``comp1`` (~68). Packing puts examples end to end into rows of ``T − 1``
positions, each slot keeping its example's own position (for the position encoding) and segment id
(attention stays causal *within* an example), so every example gets the logits it would get alone and
:func:`losses.packed_lm_loss` equals :func:`losses.lm_loss` up to float rounding. A paper-size batch
of 64 at the curriculum's start fits in ~38-45 rows instead of 64 (``benchmarks/train_step.py``).

Static shapes: the number of rows is rounded up to a multiple of ``row_multiple`` (a bucket), and
one step is compiled per bucket in use (a few at any point of the curriculum). The plan (which row
and offset each example gets, first-fit decreasing) is made on the host from the example lengths,
so a packed step syncs with the device once per step to read them; see
:func:`make_packed_train_step`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from safety_mech import grammar as gr
from safety_mech import losses
from safety_mech import replicas
from safety_mech import sharding as sharding_lib
from safety_mech import train as train_lib

ROW_MULTIPLE = 4


def needed_lengths(loss_mask_BxT):
    """Input positions each example needs: inputs 0..j−1 predict tokens 1..j, j = the index of its
    last target token (0 for an example without targets)."""
    T = loss_mask_BxT.shape[-1]
    any_B = loss_mask_BxT.any(-1)
    last_B = T - 1 - jnp.argmax(loss_mask_BxT[..., ::-1], axis=-1)
    return jnp.where(any_B, last_B, 0).astype(jnp.int32)


def plan_rows(lengths_B, row_len: int):
    """First-fit decreasing on the host: ``(row_B, offset_B, n_rows)``, numpy int32. Example b goes
    to row ``row_B[b]`` at slots ``offset_B[b] .. offset_B[b] + lengths_B[b] − 1``; longest examples
    first (ties by index), each into the first row with room. Deterministic."""
    lengths_B = np.asarray(lengths_B, np.int64)
    if lengths_B.ndim != 1 or (lengths_B < 0).any() or (lengths_B > row_len).any():
        raise ValueError(f"lengths must be a vector in [0, {row_len}], got {lengths_B}")
    order = np.argsort(-lengths_B, kind="stable")
    fill = np.zeros(len(lengths_B), np.int64)  # at most one row per example
    n_rows = 0
    row_B, offset_B = np.zeros_like(lengths_B), np.zeros_like(lengths_B)
    for b in order:
        room = np.flatnonzero(fill[:n_rows] + lengths_B[b] <= row_len)
        r = room[0] if room.size else n_rows
        n_rows = max(n_rows, r + 1)
        row_B[b], offset_B[b] = r, fill[r]
        fill[r] += lengths_B[b]
    return row_B.astype(np.int32), offset_B.astype(np.int32), max(n_rows, 1)


def bucket(n_rows: int, batch: int, row_multiple: int = ROW_MULTIPLE) -> int:
    """``n_rows`` rounded up to a multiple of ``row_multiple``, at most ``batch`` (one example per
    row always fits; a sharded batch is a multiple of the data-axis size already)."""
    return min(-(-n_rows // row_multiple) * row_multiple, batch)


def pack(batch: dict, row_B, offset_B, n_rows: int, normalize: str) -> dict:
    """Inside jit: the pretraining batch (``tokens``, ``loss_mask`` [B, T]) packed into ``n_rows``
    rows of N = T − 1 slots by the plan ``row_B``, ``offset_B`` (:func:`plan_rows`).

    Returns ``inputs`` / ``targets`` [R, N] int (PAD in empty slots), ``positions`` [R, N] (each
    slot's position in its example), ``segments`` [R, N] (example index, −1 empty), ``loss_mask``
    [R, N] bool, ``weight`` [R, N] (1 / (N_b · B) on example b's targets, ``normalize`` as in
    losses.py) and ``n_examples`` (B, float)."""
    tokens_BxT, mask_BxT = batch["tokens"], batch["loss_mask"]
    B, T = tokens_BxT.shape
    N = T - 1
    length_B = needed_lengths(mask_BxT)
    m_BxN = mask_BxT[:, 1:]
    n_tokens_B = m_BxN.sum(-1).astype(jnp.float32)
    weight_B = 1.0 / (losses.normalizer(n_tokens_B, N, normalize) * B)
    j_N = jnp.arange(N, dtype=jnp.int32)
    valid_BxN = j_N < length_B[:, None]
    rows_BxN = jnp.broadcast_to(row_B[:, None], (B, N))
    cols_BxN = jnp.where(valid_BxN, offset_B[:, None] + j_N, N)  # column N is out of range: dropped

    def scatter(values_BxN, fill, dtype):
        out = jnp.full((n_rows, N), fill, dtype)
        return out.at[rows_BxN, cols_BxN].set(values_BxN.astype(dtype), mode="drop")

    return dict(
        inputs=scatter(tokens_BxT[:, :-1], gr.PAD, jnp.int32),
        targets=scatter(tokens_BxT[:, 1:], gr.PAD, jnp.int32),
        positions=scatter(jnp.broadcast_to(j_N, (B, N)), 0, jnp.int32),
        segments=scatter(jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, N)), -1, jnp.int32),
        loss_mask=scatter(m_BxN, False, bool),
        weight=scatter(m_BxN * weight_B[:, None], 0.0, jnp.float32),
        n_examples=jnp.float32(B),
    )


def make_packed_train_step(optimizer: optax.GradientTransformation, sample_fn: Callable,
                           loss_cfg: losses.LossConfig, *, mesh=None,
                           lr_fn: Callable | None = None, row_multiple: int = ROW_MULTIPLE):
    """A pretraining step with the interface of ``train.make_train_step(losses.lm_loss, ...)``,
    ``step(state, ref_params=None) -> (state, metrics)``, that packs each batch.

    The batch is sampled by a jitted call with the key ``make_train_step`` would use (same data, so
    the same training up to float rounding), its example lengths go to the host, which plans the
    rows (:func:`plan_rows`; with replicas, the row count is the largest over replicas), and the
    update runs in a jitted, donated step compiled once per row bucket. Extra metric:
    ``train/packed_rows`` (the bucket used). With a ``mesh`` the bucket is also a multiple of the
    data-axis size."""
    if mesh is not None:
        row_multiple = int(np.lcm(row_multiple, mesh.shape[sharding_lib.DATA_AXIS]))

    def sample_one(state: train_lib.TrainState):
        batch = sample_fn(train_lib.step_key(state), state.step)
        return batch, needed_lengths(batch["loss_mask"])

    sample = jax.jit(replicas.over_replicas(sample_one))

    def one_step(state, batch, row_B, offset_B, n_rows):
        packed = sharding_lib.constrain_batch(pack(batch, row_B, offset_B, n_rows, loss_cfg.normalize), mesh)
        new_state, metrics = train_lib.update_on_batch(state, None, packed, losses.packed_lm_loss, loss_cfg,
                                                       optimizer, lr_fn)
        return new_state, {**metrics, "train/packed_rows": jnp.float32(n_rows)}

    def build(n_rows):
        fn = replicas.over_replicas(lambda s, b, r, o: one_step(s, b, r, o, n_rows))
        kwargs = {"out_shardings": sharding_lib.replicated(mesh)} if mesh is not None else {}
        return jax.jit(fn, donate_argnums=(0,), **kwargs)

    compiled: dict[int, Callable] = {}

    def step(state, ref_params=None):
        if ref_params is not None:
            raise ValueError("the packed pretraining step takes no reference params")
        batch, lengths = sample(state)
        T, B = batch["tokens"].shape[-1], batch["tokens"].shape[-2]
        lengths = np.asarray(jax.device_get(lengths)).reshape(-1, B)  # the one sync per step
        plans = [plan_rows(lengths_B, T - 1) for lengths_B in lengths]
        n_rows = bucket(max(p[2] for p in plans), B, row_multiple)
        row, offset = (np.stack([p[i] for p in plans]) for i in (0, 1))
        if n_rows not in compiled:
            compiled[n_rows] = build(n_rows)
        return compiled[n_rows](state, batch, jnp.asarray(row), jnp.asarray(offset))

    return step

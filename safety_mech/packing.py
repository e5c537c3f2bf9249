"""Sequence packing for pretraining: several short examples share one row of the model's input.

A pretraining example needs the model's positions only up to its last target token: in the
paper's curriculum half the examples at the start are ``pcfg`` mode (text only, ~37 of 114
positions) and a fifth ``comp1`` (~68). Packing puts examples end to end into rows of ``T − 1``
positions, each slot keeping its example's own position (for the position encoding) and segment id
(attention stays causal *within* an example), so every example gets the logits it would get alone and
:func:`losses.packed_lm_loss` equals :func:`losses.lm_loss` up to float rounding. A paper-size batch
of 64 at the curriculum's start fits in ~38-45 rows instead of 64 (``benchmarks/train_step.py``).

Static shapes: the number of rows is rounded up to a multiple of ``row_multiple`` (a bucket), and
one step is compiled per bucket in use (a few over the curriculum). The plan (which row and offset
each example gets, first-fit decreasing) is made on the host from the example lengths, read from
the device once per chunk of :data:`CHUNK` steps sampled ahead; see :func:`make_packed_train_step`.
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
CHUNK = 100  # steps planned together: the host reads example lengths once per chunk


def needed_lengths(loss_mask_BxT):
    """Input positions each example needs: inputs 0..j−1 predict tokens 1..j, j = the index of its
    last target token (0 for an example without targets)."""
    T = loss_mask_BxT.shape[-1]
    any_B = loss_mask_BxT.any(-1)
    last_B = T - 1 - jnp.argmax(loss_mask_BxT[..., ::-1], axis=-1)
    return jnp.where(any_B, last_B, 0).astype(jnp.int32)


def plan_many(lengths_MxB, row_len: int):
    """:func:`plan_rows` of M batches at once (numpy, vectorised over the batches): ``(row_MxB,
    offset_MxB, n_rows_M)``. One pass over the B examples in each batch's decreasing-length order;
    the first row with room is the first fitting row, and the rows not yet used are empty, so
    ``argmax`` of the fit mask is first-fit's choice."""
    lengths_MxB = np.asarray(lengths_MxB, np.int64)
    if lengths_MxB.ndim != 2 or (lengths_MxB < 0).any() or (lengths_MxB > row_len).any():
        raise ValueError(f"lengths must be [M, B] in [0, {row_len}], got {lengths_MxB}")
    M, B = lengths_MxB.shape
    order_MxB = np.argsort(-lengths_MxB, axis=1, kind="stable")
    fill_MxB = np.zeros((M, B), np.int64)  # at most one row per example
    row_MxB, offset_MxB = np.zeros((M, B), np.int64), np.zeros((M, B), np.int64)
    m_M = np.arange(M)
    for j in range(B):
        b_M = order_MxB[:, j]
        length_M = lengths_MxB[m_M, b_M]
        r_M = np.argmax(fill_MxB + length_M[:, None] <= row_len, axis=1)
        row_MxB[m_M, b_M], offset_MxB[m_M, b_M] = r_M, fill_MxB[m_M, r_M]
        fill_MxB[m_M, r_M] += length_M
    n_rows_M = np.maximum(row_MxB.max(axis=1) + 1, 1)
    return row_MxB.astype(np.int32), offset_MxB.astype(np.int32), n_rows_M


def plan_rows(lengths_B, row_len: int):
    """First-fit decreasing on the host: ``(row_B, offset_B, n_rows)``, numpy int32. Example b goes
    to row ``row_B[b]`` at slots ``offset_B[b] .. offset_B[b] + lengths_B[b] − 1``; longest examples
    first (ties by index), each into the first row with room. Deterministic."""
    lengths_B = np.asarray(lengths_B, np.int64)
    if lengths_B.ndim != 1:
        raise ValueError(f"lengths must be a vector in [0, {row_len}], got {lengths_B}")
    row, offset, n_rows = plan_many(lengths_B[None], row_len)
    return row[0], offset[0], int(n_rows[0])


def bucket(n_rows: int, batch: int, row_multiple: int = ROW_MULTIPLE) -> int:
    """``n_rows`` rounded up to a multiple of ``row_multiple``, at most ``batch`` (one example per
    row always fits; a sharded batch is a multiple of the data-axis size already)."""
    return min(-(-n_rows // row_multiple) * row_multiple, batch)


def default_row_multiple(batch: int) -> int:
    """The packed step's default ``row_multiple``: coarser buckets for a large batch (fewer compiled
    shapes), at least :data:`ROW_MULTIPLE`."""
    return max(ROW_MULTIPLE, batch // 16)


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
                           loss_cfg: losses.LossConfig, *, mesh=None, lr_fn: Callable | None = None,
                           row_multiple: int | None = None, chunk: int = CHUNK):
    """A pretraining step with the interface of ``train.make_train_step(losses.lm_loss, ...)``,
    ``step(state, ref_params=None) -> (state, metrics)``, that packs each batch.

    Steps are planned ``chunk`` at a time, chunk c holding steps ``c·chunk + 1 .. (c+1)·chunk``
    (absolute, so a resumed run plans exactly as an uninterrupted one): one jitted call samples the
    chunk's batches, with the keys ``make_train_step`` would use (same data, so the same training up
    to float rounding), the host fetches their example lengths and plans every batch's rows
    (:func:`plan_many`), and each step indexes its batch and plan inside a jitted, donated update
    compiled once per row count. A step's row count is the largest of its replicas' plans, rounded
    up to a multiple of ``row_multiple`` (default: :func:`default_row_multiple`, so that a large
    batch compiles few shapes; with a ``mesh``, also a multiple of the data-axis size). The
    next chunk is sampled at the start of the current one and planned before its last step, by which
    time the device has long sampled it and is running steps the host queued: the host never waits
    for the device within a chunk. Extra metric: ``train/packed_rows``."""
    n_data = mesh.shape[sharding_lib.DATA_AXIS] if mesh is not None else 1

    def sample_one(state: train_lib.TrainState, first_step):
        def at(step):
            batch = sample_fn(train_lib.step_key(state._replace(step=step)), step)
            return batch, needed_lengths(batch["loss_mask"])
        return jax.vmap(at)(first_step + jnp.arange(chunk, dtype=jnp.int32))

    sample = jax.jit(replicas.over_replicas(sample_one, in_axes=(0, None)))

    def one_step(state, batches, row_KxB, offset_KxB, k, n_rows):
        batch, row_B, offset_B = (jax.tree.map(lambda x: x[k], t) for t in (batches, row_KxB, offset_KxB))
        packed = sharding_lib.constrain_batch(pack(batch, row_B, offset_B, n_rows, loss_cfg.normalize), mesh)
        new_state, metrics = train_lib.update_on_batch(state, None, packed, losses.packed_lm_loss, loss_cfg,
                                                       optimizer, lr_fn)
        return new_state, {**metrics, "train/packed_rows": jnp.float32(n_rows)}

    def build(n_rows):
        fn = replicas.over_replicas(lambda s, b, r, o, k: one_step(s, b, r, o, k, n_rows), in_axes=(0, 0, 0, 0, None))
        kwargs = {"out_shardings": sharding_lib.replicated(mesh)} if mesh is not None else {}
        return jax.jit(fn, donate_argnums=(0,), **kwargs)

    compiled: dict[int, Callable] = {}
    sampled: dict[int, tuple] = {}  # chunk -> (batches, lengths) on the device
    planned: dict[int, tuple] = {}  # chunk -> (batches, rows, offsets, each step's n_rows) to train on
    host = {"step_array": None, "step": 0}  # the last returned state's step counter, and its value

    def plan(c, state):
        batches, lengths = sampled.pop(c) if c in sampled else sample(state, jnp.int32(c * chunk))
        T, B = batches["tokens"].shape[-1], batches["tokens"].shape[-2]
        lengths_MxB = np.asarray(jax.device_get(lengths)).reshape(-1, B)  # [R·K, B]: the chunk's one sync
        row, offset, n_rows_M = plan_many(lengths_MxB, T - 1)
        shape = lengths.shape  # [R, K, B] or [K, B]
        multiple = int(np.lcm(row_multiple or default_row_multiple(B), n_data))
        n_rows_K = n_rows_M.reshape(shape[:-1]).reshape(-1, chunk).max(axis=0)  # over the replicas
        planned[c] = (batches, jnp.asarray(row.reshape(shape)), jnp.asarray(offset.reshape(shape)),
                      [bucket(int(n), B, multiple) for n in n_rows_K])

    def step(state, ref_params=None):
        if ref_params is not None:
            raise ValueError("the packed pretraining step takes no reference params")
        done = host["step"] if state.step is host["step_array"] else train_lib.host_step(state)
        c, k = divmod(done, chunk)
        for old in [key for key in planned if key < c] + [key for key in sampled if key <= c]:
            planned.pop(old, None)
        if c not in planned:
            plan(c, state)
        if k == 0 and c + 1 not in sampled and c + 1 not in planned:
            sampled[c + 1] = sample(state, jnp.int32((c + 1) * chunk))
        if k == chunk - 1 and c + 1 not in planned:
            plan(c + 1, state)
        batches, row, offset, n_rows_K = planned[c]
        n_rows = n_rows_K[k]
        if n_rows not in compiled:
            compiled[n_rows] = build(n_rows)
        new_state, metrics = compiled[n_rows](state, batches, row, offset, np.int32(k))
        host["step_array"], host["step"] = new_state.step, done + 1
        return new_state, metrics

    return step

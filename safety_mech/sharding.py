"""Device mesh and shardings: data parallelism over one mesh axis named ``'data'``.

Parameters and optimizer state are replicated (``P()``); a batch is split along its example axis
(``P('data')``). Batches are sampled *inside* the jitted step from a key, so there is no host batch
to shard: the step constrains the freshly sampled batch with :func:`constrain_batch`, and XLA's SPMD
partitioner then runs the forward/backward pass data-parallel and all-reduces the gradients.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(enabled: bool, **kwargs) -> None:
    """Call ``jax.distributed.initialize(**kwargs)`` for multi-host runs (TPU pods, multi-node GPU),
    only when asked: single-host runs must not wait for a coordinator."""
    if enabled:
        jax.distributed.initialize(**kwargs)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process) with axis ``'data'``."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters, optimizer state and metrics: a full copy on every device."""
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: leading (example) axis split over ``'data'``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The example axis must split evenly over the mesh."""
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} is not divisible by the {n} devices of the mesh; "
                         f"use a multiple of {n}")


def constrain_batch(batch, mesh: Mesh | None):
    """Inside jit: shard every array of ``batch`` along its leading axis (no-op without a mesh).

    Works under ``jax.vmap`` over replicas too: the constraint then applies to the per-replica
    example axis."""
    if mesh is None:
        return batch
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, data_sharding(mesh)) if x.ndim else x, batch)


def put_replicated(tree, mesh: Mesh | None):
    """Place a pytree (params, train state) on every device of ``mesh`` (no-op without a mesh)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))

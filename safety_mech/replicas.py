"""Replicas: several models (learning rates × seeds) trained, evaluated and analysed in one
compiled call.

Every run carries a leading replica axis ``[R]`` on its training state, checkpoints and metrics,
also when R = 1. Replica ``r`` of a run with peak learning rates ``lrs`` and seeds ``seeds`` is
``grid(lrs, seeds)[r]``: learning rates outer, seeds inner, so ``lrs=(1e-3, 1e-4), seeds=(0, 1)``
gives ``(1e-3, 0), (1e-3, 1), (1e-4, 0), (1e-4, 1)``. A replica is named
``<method>/lr=<lr>/seed=<seed>`` (:func:`names`) everywhere: metric keys, tables, findings.

:func:`over_replicas` maps a function over the replica axis. A single replica runs the function
unbatched (the axis squeezed away and put back): ``jax.vmap`` over a size-1 axis compiles to other
kernels whose float rounding differs, and a one-replica run should compute exactly what the same
model trained alone computes.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax


def grid(lrs: Sequence[float], seeds: Sequence[int]) -> list[tuple[float, int]]:
    """``(peak lr, seed)`` of every replica, in replica order (learning rates outer)."""
    return [(float(lr), int(seed)) for lr in lrs for seed in seeds]


def names(method: str, lrs: Sequence[float], seeds: Sequence[int]) -> list[str]:
    """Model names of a run's replicas: ``<method>/lr=<lr %g>/seed=<seed>``."""
    return [f"{method}/lr={lr:g}/seed={seed}" for lr, seed in grid(lrs, seeds)]


def data_key(lrs: Sequence[float], seeds: Sequence[int], replica: int):
    """The key of replica ``replica``'s initialisation and data stream: ``fold_in(key(seed), i)``
    with ``i`` the index of its learning rate."""
    n_seeds = len(seeds)
    return jax.random.fold_in(jax.random.key(int(seeds[replica % n_seeds])), replica // n_seeds)


def count(tree) -> int:
    """R: the length of the leading axis of a replica-stacked pytree."""
    return int(jax.tree.leaves(tree)[0].shape[0])


def select(tree, replica: int):
    """One replica's slice of a replica-stacked pytree (params, state, metrics)."""
    return jax.tree.map(lambda x: x[replica], tree)


def stack(trees: Sequence):
    """Replica-stacked pytree [R, ...] from R trees of the same structure."""
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *trees)


def over_replicas(fn: Callable, in_axes=0) -> Callable:
    """``fn`` mapped over the leading replica axis of the arguments whose ``in_axes`` entry is 0
    (``None``: shared by every replica), as ``jax.vmap(fn, in_axes)``; outputs gain the axis. With
    one replica the call is unbatched (see the module docstring). Traceable."""
    vmapped = jax.vmap(fn, in_axes=in_axes)

    def call(*args):
        axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
        stacked = [a for a, ax in zip(args, axes) if ax == 0]
        if not stacked or count(stacked[0]) != 1:
            return vmapped(*args)
        squeezed = [select(a, 0) if ax == 0 else a for a, ax in zip(args, axes)]
        return jax.tree.map(lambda x: x[None], fn(*squeezed))

    return call

"""Chunked mapping over examples: one compiled shape for any number of examples.

Evaluation, the attack and the analyses run jitted functions over sets of host arrays in chunks;
the last chunk is filled up with the set's first examples (wrapping around) so every call has the
chunk's shape and compiles once, and the filler results are dropped.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np


def map_chunks(fn: Callable, inputs, n: int, chunk: int, *args, out_axis: int = 0):
    """``fn(inputs_chunk, *args)`` over the first ``n`` examples of ``inputs`` (a pytree of host
    arrays sharing a leading example axis) in chunks of ``min(chunk, n)``; the outputs (a pytree of
    arrays whose example axis is ``out_axis``) come back as host numpy, concatenated."""
    leaves = jax.tree.leaves(inputs)
    rows = len(leaves[0])
    if n < 1 or rows < 1:
        raise ValueError(f"map_chunks needs n >= 1 examples, got n={n} of {rows}")
    chunk = min(chunk, n)
    parts = []
    for start in range(0, n, chunk):
        idx = np.arange(start, start + chunk) % rows
        parts.append(jax.device_get(fn(jax.tree.map(lambda x: np.asarray(x)[idx], inputs), *args)))
    keep = np.arange(n)
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs], axis=out_axis).take(keep, axis=out_axis),
                        *parts)


def map_arrays(fn: Callable, arrays, chunk: int, out_axis: int = 0):
    """``fn(*arrays_chunk)`` over every example of a sequence of host arrays (sharing their leading
    axis), chunked as :func:`map_chunks`."""
    arrays = [np.asarray(a) for a in arrays]
    return map_chunks(lambda part: fn(*part), arrays, len(arrays[0]), chunk, out_axis=out_axis)

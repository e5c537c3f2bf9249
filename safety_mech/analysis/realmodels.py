"""SPEC §10.7: the weight-only analyses (§10.1 summary, §10.2 null-space scores) for two real
checkpoints stored as safetensors, e.g. Llama-2 7B (base) and Llama-2-chat 7B (fine-tuned).

Orientation: Hugging Face / PyTorch ``nn.Linear`` weights are stored ``out x in`` already
(``y = W x + b``), which is SPEC §10's convention, so tensors are used as stored, never transposed.
(For Llama, ``mlp.up_proj`` / ``mlp.gate_proj`` [11008, 4096] are the "first MLP layer" expansions
and ``mlp.down_proj`` [4096, 11008] the contraction.) Checkpoints that store ``in x out`` (e.g. GPT-2's
``Conv1D``) need ``transpose=True``.

Memory: tensors are streamed one pair at a time with ``safe_open`` (memory-mapped), so only the
current pair, its difference and its SVD factors are ever resident. SVDs run in ``dtype`` (default
float32: a 11008 x 4096 float64 SVD costs twice the time and memory for no visible change in these
statistics); the difference W_ST − W_IT is taken in float64 before the cast, so for float16/bfloat16
sources it is exact.

``safetensors`` is an optional extra (``pip install -e .[safetensors]``) and is imported lazily.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from safety_mech.analysis import weights

DEFAULT_PATTERN = r"mlp"


class CheckpointPairError(ValueError):
    """Two checkpoints whose tensors cannot be compared pair by pair (one-line message)."""


def _safe_open():
    try:
        from safetensors import safe_open
    except ImportError as e:  # optional extra
        raise ImportError("safety_mech.analysis.realmodels needs safetensors: "
                          "pip install -e .[safetensors]") from e
    return safe_open


def safetensors_files(checkpoint) -> list[Path]:
    """The files of a checkpoint given as one ``.safetensors`` file, a directory (all ``*.safetensors``
    inside, i.e. a sharded checkpoint) or a list of files. Sorted, so shard order is deterministic."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in directory {path}")
            return files
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return [path]
    files = sorted(Path(p) for p in checkpoint)
    if not files:
        raise ValueError("empty list of checkpoint files")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint files do not exist: {missing}")
    return files


def tensor_index(files: Iterable[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """name -> (file holding it, shape, dtype such as ``F16``), from the safetensors headers only (no
    tensor data is read)."""
    safe_open = _safe_open()
    index: dict = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as handle:
            for name in handle.keys():
                if name in index:
                    raise CheckpointPairError(f"tensor {name!r} is in both {index[name][0]} and {f}")
                tensor = handle.get_slice(name)
                index[name] = (Path(f), tuple(tensor.get_shape()), str(tensor.get_dtype()))
    return index


def select_matrices(index: dict, pattern: str = DEFAULT_PATTERN) -> list[str]:
    """Names of the 2-D tensors whose name matches ``pattern`` (``re.search``), in sorted order."""
    regex = re.compile(pattern)
    return sorted(n for n, (_, shape, *_) in index.items() if len(shape) == 2 and regex.search(n))


def _load(index: dict, name: str) -> np.ndarray:
    with _safe_open()(str(index[name][0]), framework="numpy") as handle:
        return handle.get_tensor(name)


def iter_matrix_pairs(base, tuned, pattern: str = DEFAULT_PATTERN, max_matrices: int | None = None):
    """Yield ``(name, W_base, W_tuned)`` one pair at a time, for the 2-D tensors of ``base`` matching
    ``pattern``. Every selected name must exist in ``tuned`` with the same shape and dtype (a
    difference across dtypes would hold the rounding between them, not the fine-tuning)."""
    idx_b = tensor_index(safetensors_files(base))
    idx_t = tensor_index(safetensors_files(tuned))
    names = select_matrices(idx_b, pattern)
    if not names:
        raise CheckpointPairError(f"no 2-D tensor in {base} matches pattern {pattern!r}")
    missing = [n for n in names if n not in idx_t]
    if missing:
        raise KeyError(f"tensors of {base} missing from {tuned}: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for name in names[:max_matrices]:
        if idx_b[name][1] != idx_t[name][1]:
            raise CheckpointPairError(f"{name}: shape {idx_b[name][1]} in {base} but {idx_t[name][1]} in {tuned}; "
                                      "compare checkpoints of one architecture")
        if idx_b[name][2] != idx_t[name][2]:
            raise CheckpointPairError(f"{name}: dtype {idx_b[name][2]} in {base} but {idx_t[name][2]} in {tuned}; "
                                      "save both checkpoints in one dtype")
        yield name, _load(idx_b, name), _load(idx_t, name)


def analyze_checkpoints(base, tuned, pattern: str = DEFAULT_PATTERN, energy: float = 0.9,
                        rank_tol: float | None = None, top: int = 8, n_random: int = 1000,
                        seed: int = 0, dtype=np.float32, transpose: bool = False,
                        max_matrices: int | None = None) -> dict:
    """SPEC §10.7: ``{name: weights.matrix_analysis(W_base, W_tuned)}`` for every 2-D tensor of
    ``base`` whose name matches ``pattern`` (default ``"mlp"``).

    ``base`` (W_IT) and ``tuned`` (W_ST) are each a ``.safetensors`` file, a directory of them or a
    list of shard files. Each result holds rel_norm, stable_rank, effective_rank,
    top_singular_values, shape [out, in] and ``null_space`` (scores, energy fraction and their random
    baselines). ``transpose=True`` for checkpoints that store kernels ``in x out``."""
    result = {}
    for name, W_b, W_t in iter_matrix_pairs(base, tuned, pattern, max_matrices):
        W_b = np.asarray(W_b, np.float64)
        dW = (np.asarray(W_t, np.float64) - W_b).astype(dtype)
        W_b = W_b.astype(dtype)
        if transpose:
            W_b, dW = W_b.T, dW.T
        result[name] = weights.delta_analysis(W_b, dW, energy, rank_tol, top, n_random, seed)
    return result

"""Weight-delta analyses of SPEC §10.1-10.3: ΔW summary, column space vs null space, row space.

Conventions (SPEC §10): a dense layer computes ``y = W x`` with ``W`` of shape ``out x in``. A Flax
kernel is ``Wᵀ`` (``in x out``); ``matrices_from_params`` does the transpose once so no caller does it
by hand. ``ΔW = W_ST − W_IT``. The "first MLP layer" is ``h_{i}/mlp/c_fc``, ``W`` of shape ``F x D``
(768 x 192 at paper scale).

Every function is pure: NumPy or JAX arrays in, NumPy arrays or plain Python floats/lists out.
Arrays that are float32 stay float32 (real-model matrices, see ``realmodels.py``); anything else
(integers, half precision, bfloat16) is computed in float64. ``weight_analysis`` casts the small
model's matrices to float64, where every SVD takes milliseconds.

Energy cut (SPEC §10): the smallest k whose top-k squared singular values reach a fraction ``e`` of the
total (``>=``; SPEC says "exceed", which differs only on exact ties). A relative rank tolerance
``rank_tol`` is the alternative: k = #{σ_i > rank_tol · σ_1}.
"""
from __future__ import annotations

import re

import numpy as np

# Dense matrices of one block, as (params path below h_{i}, name in the output).
DENSE = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _arr(x) -> np.ndarray:
    """NumPy array; float32/float64 kept, everything else (bf16, f16, ints) as float64."""
    x = np.asarray(x)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)


def _svd(M):
    """Thin SVD ``M = U diag(s) Vᵀ``: U [out, r], s [r] descending, Vt [r, in], r = min(out, in)."""
    return np.linalg.svd(_arr(M), full_matrices=False)


def _floats(x) -> list:
    return [float(v) for v in np.asarray(x).ravel()]


def energy_rank(s, energy: float = 0.9) -> int:
    """Energy cut (SPEC §10): smallest k with Σ_{i<k} s_i² >= energy · Σ_i s_i²; 0 for a zero matrix.

    ``s`` are singular values (any order; sorted here)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    sq = np.sort(np.square(np.asarray(s, np.float64)))[::-1]
    total = sq.sum()
    if total == 0.0:
        return 0
    cum = np.cumsum(sq) / total
    # Rounding may leave the last cumulative value a hair under 1: never return more than len(s).
    return int(min(np.searchsorted(cum, energy * (1.0 - 1e-12), side="left") + 1, len(sq)))


def tol_rank(s, rank_tol: float) -> int:
    """Rank at a relative tolerance: #{σ_i > rank_tol · max σ}; 0 for a zero matrix."""
    s = np.asarray(s, np.float64)
    if s.size == 0 or s.max() == 0.0:
        return 0
    return int(np.sum(s > rank_tol * s.max()))


def stable_rank(M) -> float:
    """Stable rank ‖M‖_F² / ‖M‖₂² (SPEC §10.1); 0 for a zero matrix."""
    s = np.linalg.svd(_arr(M), compute_uv=False)
    return _stable_rank_from_s(s)


def _stable_rank_from_s(s) -> float:
    s = np.asarray(s, np.float64)
    return float(np.sum(s ** 2) / s.max() ** 2) if s.size and s.max() > 0 else 0.0


def relative_norm(dW, W) -> float:
    """‖ΔW‖_F / ‖W‖_F (SPEC §10.1)."""
    return float(np.linalg.norm(_arr(dW)) / np.linalg.norm(_arr(W)))


# ----------------------------------------------------------------------------------------------
# §10.1 weight-delta summary
# ----------------------------------------------------------------------------------------------


def delta_summary(W_it, W_st, energy: float = 0.9, top: int = 8) -> dict:
    """SPEC §10.1 for one matrix: rel_norm ‖ΔW‖_F/‖W_IT‖_F, stable_rank, effective_rank (energy cut)
    and the ``top`` largest singular values of ΔW = W_ST − W_IT (plain floats, JSON-ready)."""
    W_it, W_st = _arr(W_it), _arr(W_st)
    if W_it.shape != W_st.shape:
        raise ValueError(f"W_it {W_it.shape} and W_st {W_st.shape} differ in shape")
    dW = W_st - W_it
    return _summary(W_it, dW, np.linalg.svd(dW, compute_uv=False), energy, top)


def _summary(W_it, dW, s_dW, energy, top) -> dict:
    return dict(
        rel_norm=relative_norm(dW, W_it),
        stable_rank=_stable_rank_from_s(s_dW),
        effective_rank=energy_rank(s_dW, energy),
        top_singular_values=_floats(s_dW[:top]),
    )


# ----------------------------------------------------------------------------------------------
# §10.2 column space vs null space
# ----------------------------------------------------------------------------------------------


def column_basis(W_it, energy: float = 0.9, rank_tol: float | None = None) -> np.ndarray:
    """U_IT [out, k]: W_IT's top-k left singular vectors, k from the energy cut (or ``rank_tol``)."""
    U, s, _ = _svd(W_it)
    k = tol_rank(s, rank_tol) if rank_tol is not None else energy_rank(s, energy)
    return U[:, :k]


def _outside(U, X):
    """Columns of (I − U Uᵀ) X, computed without forming the out x out projector."""
    return X - U @ (U.T @ X)


def null_space_scores(W_it, dW, energy: float = 0.9, rank_tol: float | None = None, top: int = 8,
                      n_random: int = 1000, seed: int = 0, *, svd_dW=None) -> dict:
    """SPEC §10.2: how much of ΔW writes outside col(W_IT), i.e. into the null space of W_ITᵀ.

    With P = U_IT U_ITᵀ (``column_basis``) and u_i ΔW's top left singular vectors:

    * ``scores``: s_i = ‖(I − P) u_i‖ ∈ [0, 1] for the ``top`` largest singular values
      (1 = entirely outside col(W_IT)); ``singular_values`` the matching σ_i of ΔW.
    * ``energy_fraction``: ‖(I − P) ΔW‖_F² / ‖ΔW‖_F².
    * baselines, without which the numbers mean nothing (a random direction in R^768 already scores
      ≈0.87 against a rank-192 column space): ``random_score_expected`` = sqrt(1 − k_IT/out), the
      score of a random unit vector (exact in mean square); ``random_score_empirical`` (and ``_std``),
      the mean over ``n_random`` seeded Gaussian unit vectors; ``random_energy_fraction`` = 1 − k_IT/out,
      the expected energy fraction of a matrix with random (isotropic) columns.

    ``svd_dW``: ΔW's thin SVD ``(U, s, Vt)`` if already computed (``delta_analysis`` shares it).
    """
    W_it, dW = _arr(W_it), _arr(dW)
    if W_it.shape != dW.shape:
        raise ValueError(f"W_it {W_it.shape} and dW {dW.shape} differ in shape")
    out = W_it.shape[0]
    U_it = column_basis(W_it, energy, rank_tol)
    k_it = U_it.shape[1]
    U_d, s_d, _ = svd_dW if svd_dW is not None else _svd(dW)
    n_top = min(top, int(np.sum(s_d > 0)))
    scores = np.linalg.norm(_outside(U_it, U_d[:, :n_top]), axis=0)
    total = np.sum(dW.astype(np.float64) ** 2)
    energy_fraction = float(np.sum(_outside(U_it, dW) ** 2) / total) if total > 0 else float("nan")
    r = np.random.default_rng(seed).standard_normal((out, n_random)).astype(U_it.dtype)
    r /= np.linalg.norm(r, axis=0)
    random_scores = np.linalg.norm(_outside(U_it, r), axis=0)
    return dict(
        k_it=k_it,
        out_dim=out,
        scores=_floats(scores),
        singular_values=_floats(s_d[:n_top]),
        energy_fraction=energy_fraction,
        random_score_expected=float(np.sqrt(1.0 - k_it / out)),
        random_score_empirical=float(random_scores.mean()),
        random_score_std=float(random_scores.std()),
        random_energy_fraction=float(1.0 - k_it / out),
    )


def matrix_analysis(W_it, W_st, energy: float = 0.9, rank_tol: float | None = None, top: int = 8,
                    n_random: int = 1000, seed: int = 0) -> dict:
    """SPEC §10.1 + §10.2 for one matrix pair: ``delta_analysis(W_it, W_st − W_it, ...)``."""
    W_it, W_st = _arr(W_it), _arr(W_st)
    if W_it.shape != W_st.shape:
        raise ValueError(f"W_it {W_it.shape} and W_st {W_st.shape} differ in shape")
    return delta_analysis(W_it, W_st - W_it, energy, rank_tol, top, n_random, seed)


def delta_analysis(W_it, dW, energy: float = 0.9, rank_tol: float | None = None, top: int = 8,
                   n_random: int = 1000, seed: int = 0) -> dict:
    """SPEC §10.1 + §10.2 from W_IT and ΔW: ``shape`` [out, in], the ``delta_summary`` keys, and
    ``null_space`` (the dict of ``null_space_scores``); one SVD of ΔW serves both."""
    W_it, dW = _arr(W_it), _arr(dW)
    svd_dW = _svd(dW)
    return dict(shape=list(W_it.shape), **_summary(W_it, dW, svd_dW[1], energy, top),
                null_space=null_space_scores(W_it, dW, energy, rank_tol, top, n_random, seed,
                                             svd_dW=svd_dW))


# ----------------------------------------------------------------------------------------------
# §10.3 row space
# ----------------------------------------------------------------------------------------------


def row_space_stats(W_it, dW, a, top: int = 8) -> dict:
    """SPEC §10.3: how strongly ΔW acts on inputs ``a`` [..., in] (e.g. MLP inputs at EOT and after).

    Per example (leading shape of ``a`` kept):
    ``delta_over_input`` ‖ΔW a‖/‖a‖, ``delta_over_base`` ‖ΔW a‖/‖W_IT a‖, and
    ``projections`` [..., top] = σ_j · cos(a, v_j) for ΔW's top right singular vectors v_j (so
    ‖ΔW a‖/‖a‖ = sqrt(Σ_j projections_j²) when ``top`` covers ΔW's rank). ``singular_values`` [top].
    Float64 NumPy arrays."""
    W_it, dW = np.asarray(W_it, np.float64), np.asarray(dW, np.float64)
    a = np.asarray(a, np.float64)
    if a.shape[-1] != W_it.shape[1] or W_it.shape != dW.shape:
        raise ValueError(f"need a [..., in] with W_it, dW [out, in]; got a {a.shape}, "
                         f"W_it {W_it.shape}, dW {dW.shape}")
    lead, a_NxI = a.shape[:-1], a.reshape(-1, a.shape[-1])
    a_norm = np.linalg.norm(a_NxI, axis=1)
    d_norm = np.linalg.norm(a_NxI @ dW.T, axis=1)
    base_norm = np.linalg.norm(a_NxI @ W_it.T, axis=1)
    _, s, Vt = np.linalg.svd(dW, full_matrices=False)
    k = min(top, len(s))
    proj = (a_NxI @ Vt[:k].T) * s[:k] / a_norm[:, None]
    return dict(
        delta_over_input=(d_norm / a_norm).reshape(lead),
        delta_over_base=(d_norm / base_norm).reshape(lead),
        projections=proj.reshape(*lead, k),
        singular_values=s[:k],
    )


# ----------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------


def matrices_from_params(params, pattern: str | None = None) -> dict:
    """Every dense matrix of the blocks as ``W`` [out, in] (``y = W x``, SPEC §10), NumPy, keyed
    ``"h_{i}/mlp/c_fc"`` etc. in layer order (attn c_attn, attn c_proj, mlp c_fc, mlp c_proj).

    The Flax kernel ``Wᵀ`` is transposed here, so ``W @ x == x @ kernel``. ``pattern`` (a regex,
    ``re.search`` on the key) keeps a subset, e.g. ``"mlp/c_fc"`` for the first MLP layers."""
    layers = sorted((k for k in params if re.fullmatch(r"h_\d+", k)), key=lambda k: int(k[2:]))
    out = {}
    for layer in layers:
        for path in DENSE:
            name = f"{layer}/{path}"
            if pattern is not None and not re.search(pattern, name):
                continue
            node = params[layer]
            for part in path.split("/"):
                node = node[part]
            out[name] = np.asarray(node["kernel"]).T
    return out


def weight_analysis(params_it, params_st, energy: float = 0.9, rank_tol: float | None = None,
                    top: int = 8, n_random: int = 1000, seed: int = 0,
                    pattern: str | None = None) -> dict:
    """SPEC §10.1-10.2 for a pretrained (IT) and a fine-tuned (ST) model: nested dict
    ``{"h_0": {"mlp/c_fc": matrix_analysis(...), ...}, ...}`` over every dense matrix (or those whose
    name matches ``pattern``). Computed in float64; JSON-serialisable (floats, ints, lists; a matrix
    with ΔW = 0 has ``energy_fraction`` NaN, which ``json.dumps`` writes as ``NaN``)."""
    it = matrices_from_params(params_it, pattern)
    st = matrices_from_params(params_st, pattern)
    if it.keys() != st.keys():
        raise ValueError(f"models differ in dense matrices: {sorted(it.keys() ^ st.keys())}")
    result: dict = {}
    for name, W_it in it.items():
        layer, path = name.split("/", 1)
        result.setdefault(layer, {})[path] = matrix_analysis(
            W_it.astype(np.float64), st[name].astype(np.float64), energy, rank_tol, top, n_random, seed)
    return result

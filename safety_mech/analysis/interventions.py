"""SPEC §10.6 interventions: θ(α) = θ_IT + α(θ_ST − θ_IT) and sweeps of metrics (and τ) along α.

* :func:`interpolate` — θ(α) on plain param pytrees, all weights or the MLP only;
* :func:`alpha_sweep` — a caller-supplied ``metrics_fn(params) -> {name: float}`` (and optionally
  ``extra_fn(params) -> {name: array}``, e.g. τ) evaluated at each α, stacked along α;
* :func:`set_taus` / :func:`make_tau_fn` — τ per layer of several evaluation sets with the cluster
  means of the same params (SPEC §10.4), the ``extra_fn`` for τ along α;
* :func:`delta_arithmetic` — ΔW arithmetic across methods (SPEC §8, θ_IT + ΔW_A + ΔW_B);
  :func:`interpolate` is the one-model case of it.

The metrics are the caller's (Instruct, Null, attack success come from the evaluation code), so this
module depends on no evaluation detail.

Precision: θ(α) is computed in float64 and rounded once to the leaves' dtype, so α = 0 and α = 1 give
θ_IT and θ_ST bit for bit (the float64 difference of two float32 numbers is exact, and so is adding it
back), and any other α is the correctly rounded float32 value of SPEC's formula.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from safety_mech.analysis import activations

# The MLP of block i: h_{i}/mlp/{c_fc,c_proj}/{kernel,bias} (model.py's layout). ln_2 (prenorm's norm
# before the MLP) is not part of it.
_MLP_PATH = re.compile(r"h_\d+/mlp/")


def delta_arithmetic(base, *finetuned, alphas=None):
    """θ_IT + Σ_i α_i (θ_i − θ_IT) on plain param pytrees (default α_i = 1: θ_IT + ΔW_A + ΔW_B + ...).

    ``base`` is θ_IT, each of ``finetuned`` a model fine-tuned from it (same tree, same shapes: select
    one replica of a replica-stacked run first). Leaves keep ``base``'s dtype; numpy in, numpy out.
    """
    if not finetuned:
        raise ValueError("delta_arithmetic needs at least one fine-tuned model")
    alphas = (1.0,) * len(finetuned) if alphas is None else tuple(float(a) for a in alphas)
    if len(alphas) != len(finetuned):
        raise ValueError(f"{len(alphas)} alphas for {len(finetuned)} fine-tuned models")
    structure = jax.tree.structure(base)
    for i, tree in enumerate(finetuned):
        if jax.tree.structure(tree) != structure:
            raise ValueError(f"fine-tuned model {i} has a different tree structure than the base")

    def combine(path, b, *fs):
        for i, f in enumerate(fs):
            if f.shape != b.shape:  # would broadcast silently (e.g. a replica-stacked run)
                raise ValueError(f"fine-tuned model {i}: {jax.tree_util.keystr(path)} has shape {f.shape}, "
                                 f"base {b.shape}")
        return (b + sum(a * (f - b) for a, f in zip(alphas, fs))).astype(b.dtype)

    return jax.tree_util.tree_map_with_path(combine, base, *finetuned)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def is_mlp_path(path: str) -> bool:
    """Whether a ``/``-joined params path (``"h_0/mlp/c_fc/kernel"``) is an MLP weight or bias."""
    return _MLP_PATH.match(path) is not None


def interpolate(params_it, params_st, alpha: float, mlp_only: bool = False):
    """SPEC §10.6 θ(α) = θ_IT + α(θ_ST − θ_IT) as a pytree of NumPy arrays of θ_IT's dtypes.

    ``mlp_only``: only the MLP weights and biases (``h_{i}/mlp/...``) move; attention, LayerNorms,
    embeddings, positions and the head stay θ_IT's, bit for bit. α = 0 gives θ_IT and α = 1 gives
    θ_ST (or θ_ST's MLP in θ_IT) exactly; α > 1 extrapolates. Trees must match in structure and
    shapes (select one replica of a replica-stacked run first)."""
    it = jax.tree.map(np.asarray, params_it)
    st = jax.tree.map(np.asarray, params_st)
    if mlp_only:
        if jax.tree.structure(st) != jax.tree.structure(it):
            raise ValueError("params_it and params_st differ in tree structure")
        st = jax.tree_util.tree_map_with_path(
            lambda p, a, b: b if is_mlp_path(_path_str(p)) else a, it, st)
    mixed = delta_arithmetic(jax.tree.map(lambda x: x.astype(np.float64), it),
                             jax.tree.map(lambda x: x.astype(np.float64), st), alphas=(alpha,))
    return jax.tree.map(lambda m, x: m.astype(x.dtype), mixed, it)


def alpha_sweep(params_it, params_st, alphas: Sequence[float], metrics_fn: Callable,
                mlp_only: bool = False, extra_fn: Callable | None = None,
                progress: Callable | None = None, at_zero: tuple | None = None) -> dict:
    """Evaluate θ(α) (:func:`interpolate`) at every α.

    ``metrics_fn(params) -> {name: float}``; ``extra_fn(params) -> {name: array}`` (optional, e.g.
    :func:`make_tau_fn`'s τ means per layer). Returns ``{"alpha": [A], "metrics": {name: [A]},
    "extra": {name: [A, ...]}}`` of float64 NumPy arrays (``extra`` empty without ``extra_fn``).
    Every call must return the same names. ``progress(i, alpha)`` is called before each α.
    ``at_zero``: ``(metrics_fn(θ_IT), extra_fn(θ_IT) or None)`` computed once by the caller, used for
    α = 0 (θ(0) is θ_IT bit for bit), e.g. when sweeping several fine-tuned models from one base."""
    alphas = np.asarray([float(a) for a in alphas], np.float64)
    if alphas.ndim != 1 or alphas.size == 0:
        raise ValueError("alphas must be a non-empty sequence of numbers")
    metrics, extra = [], []
    for i, alpha in enumerate(alphas):
        if progress is not None:
            progress(i, float(alpha))
        if alpha == 0.0 and at_zero is not None:
            metrics.append(dict(at_zero[0]))
            if extra_fn is not None:
                extra.append(dict(at_zero[1]))
            continue
        params = interpolate(params_it, params_st, float(alpha), mlp_only)
        metrics.append(dict(metrics_fn(params)))
        if extra_fn is not None:
            extra.append(dict(extra_fn(params)))
    return dict(alpha=alphas, metrics=_stack(metrics, "metrics_fn"), extra=_stack(extra, "extra_fn"))


def _stack(records: list, what: str) -> dict:
    if not records:
        return {}
    names = list(records[0])
    for r in records[1:]:
        if list(r) != names:
            raise ValueError(f"{what} returned different names along α: {names} vs {list(r)}")
    return {k: np.stack([np.asarray(r[k], np.float64) for r in records]) for k in names}


# ----------------------------------------------------------------------------------------------
# τ of several sets with one model's own cluster means (SPEC §10.4), e.g. along α
# ----------------------------------------------------------------------------------------------


def set_taus(params, model_cfg, heldout_safe: Mapping, heldout_unsafe: Mapping, sets: Mapping,
             extra_acts: Mapping[str, Callable] | None = None, **kwargs) -> dict:
    """SPEC §10.4 with the cluster means μ_S, μ_U of ``params`` itself: ``{name: τ [L, N]}`` for every
    evaluation-set batch in ``sets`` (``safety_data.sample_eval_set`` dicts; the true output is
    teacher-forced), μ from the held-out batches. ``extra_acts``: more inputs given as
    ``{name: fn(params) -> a [L, N, W]}`` (e.g. soft-token inputs, which are embeddings, not tokens).
    ``kwargs`` go to :func:`activations.set_activations` (site, positions, layers, batch_size)."""
    mu_s, mu_u = activations.cluster_means(activations.set_activations(params, model_cfg, heldout_safe, **kwargs),
                                           activations.set_activations(params, model_cfg, heldout_unsafe, **kwargs))
    taus = {name: activations.tau(activations.set_activations(params, model_cfg, batch, **kwargs), mu_s, mu_u)
            for name, batch in sets.items()}
    for name, fn in (extra_acts or {}).items():
        taus[name] = activations.tau(fn(params), mu_s, mu_u)
    return taus


def make_tau_fn(model_cfg, heldout_safe: Mapping, heldout_unsafe: Mapping, sets: Mapping, **kwargs) -> Callable:
    """``extra_fn`` for :func:`alpha_sweep`: ``params -> {"tau_mean/<set>": [L]}``, the mean τ per
    layer of each set (:func:`set_taus`)."""

    def tau_fn(params) -> dict:
        taus = set_taus(params, model_cfg, heldout_safe, heldout_unsafe, sets, **kwargs)
        return {f"tau_mean/{name}": t.mean(1) for name, t in taus.items()}

    return tau_fn

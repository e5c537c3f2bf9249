"""SPEC §10.4: activation clustering τ per layer (and the per-example MLP inputs §10.3 needs).

a(x) = an activation site of ``model.apply(..., capture=True)`` (default ``"mlp_hidden"``, the MLP's
F units after GELU, *all* of them: REF kept only the first 192 of 768, a bug) averaged over the EOT
position and the next ``positions - 1`` positions (default 10: EOT and 9 more) of the teacher-forced
sequence. For every evaluation set the task-following output (``tokens_true``) is teacher-forced
(SPEC §10.4), which ``set_activations`` does.

μ_S, μ_U = means over held-out safe and unsafe inputs (``cluster_means``);
τ(x) = ‖a − μ_U‖ − ‖a − μ_S‖ per layer (``tau``; positive = closer to the safe cluster).

Shapes: L layers (selected), N examples, T positions, W site width (F for mlp_hidden, D otherwise).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from safety_mech import batching, model


@functools.partial(jax.jit, static_argnames=("model_cfg", "site", "positions", "layers", "average", "embedded"))
def window(params, inputs, prompt_len_B, *, model_cfg, site, positions, layers=None, average=False, embedded=False):
    """[L, B, P, W]: the site's activations at positions EOT .. EOT + P − 1, EOT = prompt_len − 1
    ([L, B, W], their mean over P, with ``average``: reduced on device, 10x less to transfer), for
    token ids ``inputs`` [B, T] or, with ``embedded``, input embeddings [B, T, D] (soft tokens)."""
    _, acts = model.apply(params, model_cfg, **{"embeddings" if embedded else "tokens": inputs}, capture=True)
    act_LxBxTxW = acts[site] if layers is None else acts[site][jnp.asarray(layers)]
    idx_BxP = prompt_len_B[:, None] - 1 + jnp.arange(positions)[None]
    win_LxBxPxW = jax.vmap(lambda a_BxTxW: jnp.take_along_axis(a_BxTxW, idx_BxP[..., None], axis=1))(act_LxBxTxW)
    return win_LxBxPxW.mean(2) if average else win_LxBxPxW


def collect_window(params, model_cfg: model.ModelConfig, tokens, prompt_len, site: str = "mlp_hidden",
                   positions: int = 10, layers=None, batch_size: int = 128) -> np.ndarray:
    """[L, N, P, W] float32 NumPy: the ``site`` activations of the teacher-forced ``tokens`` [N, T] at
    positions EOT = prompt_len−1 .. EOT+P−1, P = ``positions`` (SPEC §10.3-10.4; e.g. site="mlp_in"
    gives the MLP inputs for ``weights.row_space_stats``).

    ``layers``: None (all) or a sequence of layer indices. Jitted, run in chunks of ``batch_size``;
    positions after the last window are cut before the forward pass (the model is causal, so this
    changes nothing)."""
    return _collect(params, model_cfg, tokens, prompt_len, site, positions, layers, batch_size, False)


def _collect(params, model_cfg, tokens, prompt_len, site, positions, layers, batch_size, average):
    if site not in model.ACT_NAMES:
        raise ValueError(f"unknown activation site {site!r}; choose one of {model.ACT_NAMES}")
    tokens, prompt_len = np.asarray(tokens), np.asarray(prompt_len)
    T = int(np.max(prompt_len)) - 1 + positions  # last window position + 1
    if np.any(prompt_len < 1) or T > tokens.shape[1]:
        raise ValueError(f"every window EOT..EOT+{positions - 1} (EOT = prompt_len - 1 >= 0) must fit in "
                         f"the {tokens.shape[1]} positions of tokens; max prompt_len is {np.max(prompt_len)}")
    fn = functools.partial(window, params, model_cfg=model_cfg, site=site, positions=positions,
                           layers=None if layers is None else tuple(int(i) for i in layers), average=average)
    return batching.map_arrays(fn, (tokens[:, :T].astype(np.int32), prompt_len.astype(np.int32)), batch_size,
                         out_axis=1)


def collect_activations(params, model_cfg: model.ModelConfig, tokens, prompt_len,
                        site: str = "mlp_hidden", positions: int = 10, layers=None,
                        batch_size: int = 128) -> np.ndarray:
    """SPEC §10.4 a(x): [L, N, W] float32, ``collect_window`` averaged over its P positions
    (default: EOT and the next 9)."""
    return _collect(params, model_cfg, tokens, prompt_len, site, positions, layers, batch_size, True)


def set_activations(params, model_cfg: model.ModelConfig, batch: dict, **kwargs) -> np.ndarray:
    """``collect_activations`` for an evaluation-set batch (``safety_data.sample_eval_set``): the true
    (task-following) output is teacher-forced for every set, as SPEC §10.4 says."""
    return collect_activations(params, model_cfg, batch["tokens_true"], batch["prompt_len"], **kwargs)


def cluster_means(acts_safe, acts_unsafe):
    """(μ_S, μ_U), each [L, W]: means over the examples (axis 1) of held-out safe / unsafe
    activations [L, N, W] (SPEC §10.4)."""
    return np.asarray(acts_safe).mean(1), np.asarray(acts_unsafe).mean(1)


def tau(acts, mu_safe, mu_unsafe) -> np.ndarray:
    """SPEC §10.4 τ = ‖a − μ_U‖ − ‖a − μ_S‖, [L, N] for acts [L, N, W] and means [L, W];
    positive = closer to the safe cluster."""
    acts = np.asarray(acts, np.float64)
    d_unsafe = np.linalg.norm(acts - np.asarray(mu_unsafe)[:, None], axis=-1)
    d_safe = np.linalg.norm(acts - np.asarray(mu_safe)[:, None], axis=-1)
    return d_unsafe - d_safe


def tau_summary(tau_LxN) -> dict:
    """Mean and std over examples per layer (SPEC §10.4 "mean ± std per set and layer"), plus n;
    JSON-ready lists."""
    t = np.asarray(tau_LxN, np.float64)
    return dict(mean=[float(v) for v in t.mean(1)], std=[float(v) for v in t.std(1)], n=int(t.shape[1]))

"""Incremental decoding with a key/value cache: one forward pass over a prompt array, then one
position per step.

Greedy decoding used to run the whole [B, T] array through the model for every generated token;
with a cache each new token costs one position's worth of the model (its projections and MLP, and
attention over the cached keys), so a continuation of N tokens costs about one full pass plus N
single-position steps instead of N full passes.

Cache layout (a dict, a pytree: it can be a ``fori_loop`` carry and is vmapped like any array)::

    cache["k"]   [L, B, H, S, K]   keys of layer l, row b, head h, position s (compute dtype)
    cache["v"]   [L, B, H, S, K]   values, same layout

``S`` is the length of the array given to :func:`prefill` (at most ``cfg.seq_len``); the layout is
``model.qkv_heads``' heads-first [B, H, T, K] stacked over layers, so the cached keys are exactly the
ones the full forward pass attends to. There is no length field: every :func:`decode_step` is told
each row's position ``pos_B`` and attends to the entries ``s <= pos_B`` of that row only, so entries
past a row's position (the prefill's keys of whatever the array held there, or a later step's) are
never read before that row's own step at that position overwrites them. Rows may be at different
positions (prompts of different lengths).

The math is ``model``'s, through its public building blocks only: :func:`prefill` *is*
``model.apply`` (``embeddings=``, positions added there) with the activations captured, the keys and
values read off each block's attention input ``LN1(block_in)`` with ``model.layer_norm`` and
``model.qkv_heads`` (XLA merges this with the identical projection inside the forward pass: the
compiled prefill has as many dot products as ``model.apply``). :func:`decode_step` adds
``model.position_encoding`` to the new position's embedding and runs ``model.block`` for that one
position, its ``attend`` hook computing the new query, key and value (``model.qkv_heads``), writing
the key and value into the cache, and attending over the row's visible cache entries with
``model.attend`` (the full pass's softmax attention) and ``model.merge_heads``; ``model.unembed``
gives the logits.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from safety_mech import model as model_lib

CACHE_KEYS = ("k", "v")


def prefill(params, cfg: model_lib.ModelConfig, embeddings_BxTxD):
    """One forward pass over ``embeddings_BxTxD`` (token or soft embeddings, no positions; as
    ``model.apply(..., embeddings=...)``): returns ``(logits [B, T, V] float32, cache)`` with the
    keys and values of all T positions (layout in the module docstring, S = T)."""
    logits_BxTxV, acts = model_lib.apply(params, cfg, embeddings=embeddings_BxTxD, capture=True)
    dt = jnp.dtype(cfg.dtype)
    k_layers, v_layers = [], []
    for i in range(cfg.n_layer):
        p = params[f"h_{i}"]
        # Both blocks feed attention LN1(block_in) (model docstring), so this is the pass's own k, v.
        attn_in_BxTxD = model_lib.layer_norm(acts["block_in"][i], p["ln_1"], cfg.ln_eps)
        _, k_BxHxTxK, v_BxHxTxK = model_lib.qkv_heads(attn_in_BxTxD, p["attn"], cfg, dt)
        k_layers.append(k_BxHxTxK)
        v_layers.append(v_BxHxTxK)
    return logits_BxTxV, {"k": jnp.stack(k_layers), "v": jnp.stack(v_layers)}


def check_cache(cache, cfg: model_lib.ModelConfig, batch: int | None = None) -> int:
    """Trace-time check that ``cache`` has :func:`prefill`'s layout for ``cfg`` (and ``batch`` rows);
    returns its length S. One-line ``ValueError`` otherwise."""
    if not isinstance(cache, dict) or set(cache) != set(CACHE_KEYS):
        got = sorted(cache) if isinstance(cache, dict) else type(cache).__name__
        raise ValueError(f"cache must be a dict with keys {list(CACHE_KEYS)} (from kv_cache.prefill), got {got}")
    k, v = cache["k"], cache["v"]
    if k.shape != v.shape:
        raise ValueError(f"cache keys {tuple(k.shape)} and values {tuple(v.shape)} differ in shape")
    H = cfg.n_head
    K = cfg.d_model // H
    if k.ndim != 5 or (k.shape[0], k.shape[2], k.shape[4]) != (cfg.n_layer, H, K):
        raise ValueError(f"cache has shape {tuple(k.shape)}, cfg wants [L={cfg.n_layer}, B, H={H}, S, K={K}]")
    if batch is not None and k.shape[1] != batch:
        raise ValueError(f"cache holds {k.shape[1]} rows but the step has {batch}")
    if k.shape[3] > cfg.seq_len:
        raise ValueError(f"cache length {k.shape[3]} > cfg.seq_len={cfg.seq_len}")
    return k.shape[3]


def decode_step(params, cfg: model_lib.ModelConfig, cache, token_B=None, pos_B=None, *, embedding_BxD=None):
    """Run one position per row through the model against ``cache``: returns ``(logits [B, V],
    cache)``, the next-token logits at ``pos_B`` and the cache with that position's keys and values
    written.

    The input of row b is ``token_B[b]``'s embedding, or ``embedding_BxD[b]`` (pass exactly one;
    e.g. a soft token), plus position ``pos_B[b]``'s encoding; it attends to the cached positions
    ``<= pos_B[b]`` of its row. ``pos_B`` (int [B], per row) must lie in [0, S): checked when
    concrete; a traced position outside is clipped (the step then computes a position nobody asked
    for: callers mask such rows out). Traceable.
    """
    if (token_B is None) == (embedding_BxD is None):
        raise ValueError("pass exactly one of token_B=[B] ints or embedding_BxD=[B, d_model]")
    if pos_B is None:
        raise ValueError("decode_step needs pos_B=[B] positions")
    model_lib.check_params(params, cfg)
    if embedding_BxD is None:
        token_B = jnp.asarray(token_B)
        if token_B.ndim != 1 or not jnp.issubdtype(token_B.dtype, jnp.integer):
            raise ValueError(f"token_B must be [B] integers, got shape {token_B.shape} dtype {token_B.dtype}")
        x_BxD = jnp.take(params["wte"]["embedding"], token_B, axis=0)
    else:
        x_BxD = jnp.asarray(embedding_BxD)
        if x_BxD.ndim != 2 or x_BxD.shape[1] != cfg.d_model:
            raise ValueError(f"embedding_BxD must be [B, d_model={cfg.d_model}], got {x_BxD.shape}")
    B = x_BxD.shape[0]
    S = check_cache(cache, cfg, B)
    pos_B = jnp.asarray(pos_B)
    if pos_B.shape != (B,) or not jnp.issubdtype(pos_B.dtype, jnp.integer):
        raise ValueError(f"pos_B must be [B={B}] integers, got shape {pos_B.shape} dtype {pos_B.dtype}")
    if not isinstance(pos_B, jax.core.Tracer) and B:
        lo, hi = int(np.min(pos_B)), int(np.max(pos_B))
        if lo < 0 or hi >= S:
            raise ValueError(f"positions span [{lo}, {hi}], outside the cache's [0, {S})")
    pos_B = jnp.clip(pos_B, 0, S - 1)

    pos_BxD = model_lib.position_encoding(params, cfg, pos_B)  # the rows apply adds at these positions
    x_Bx1xD = (x_BxD.astype(jnp.float32) + pos_BxD)[:, None, :]

    dt = jnp.dtype(cfg.dtype)
    rows_B = jnp.arange(B)
    visible_Bx1x1xS = (jnp.arange(S) <= pos_B[:, None])[:, None, None, :]
    k_LxBxHxSxK, v_LxBxHxSxK = cache["k"], cache["v"]

    def attend(layer, attn_in_Bx1xD, p_attn):
        """Attention of the new position over its row's cache, after writing its own k, v there."""
        nonlocal k_LxBxHxSxK, v_LxBxHxSxK
        q_BxHx1xK, k_BxHx1xK, v_BxHx1xK = model_lib.qkv_heads(attn_in_Bx1xD, p_attn, cfg, dt)
        k_LxBxHxSxK = k_LxBxHxSxK.at[layer, rows_B, :, pos_B].set(k_BxHx1xK[:, :, 0].astype(k_LxBxHxSxK.dtype))
        v_LxBxHxSxK = v_LxBxHxSxK.at[layer, rows_B, :, pos_B].set(v_BxHx1xK[:, :, 0].astype(v_LxBxHxSxK.dtype))
        k_BxHxSxK, v_BxHxSxK = k_LxBxHxSxK[layer].astype(dt), v_LxBxHxSxK[layer].astype(dt)
        y_BxHx1xK = model_lib.attend(q_BxHx1xK, k_BxHxSxK, v_BxHxSxK, visible_Bx1x1xS, dt)
        return model_lib.merge_heads(y_BxHx1xK, p_attn, cfg, dt)

    for i in range(cfg.n_layer):  # model's own blocks, one position, attention against the cache
        x_Bx1xD, _ = model_lib.block(x_Bx1xD, params[f"h_{i}"], cfg, dt, attend=functools.partial(attend, i))
    logits_BxV = model_lib.unembed(params, cfg, x_Bx1xD)[:, 0]
    return logits_BxV, {"k": k_LxBxHxSxK, "v": v_LxBxHxSxK}

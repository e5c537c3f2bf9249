"""Greedy decoding with a key/value cache (``kv_cache.py``).

Decoding runs at a fixed shape: the prompt array [B, T] (BOS..EOT then PAD) is filled in place,
one position per iteration, at ``prompt_len + i`` for every example at once. One forward pass over
the whole array fills the cache (causal attention makes the PAD tail invisible to the prompt's
positions), and every further token is one single-position step against that cache instead of a
full forward pass.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from safety_mech import kv_cache
from safety_mech import model as model_lib




def greedy_decode(params, model_cfg: model_lib.ModelConfig, prompt_BxT, prompt_len_B, max_new: int | None = None,
                  *, soft_mask_BxT=None, soft_BxTxD=None):
    """Greedy continuation of every prompt up to the end of the array (or ``max_new`` tokens).

    ``prompt_BxT`` holds each prompt in positions ``< prompt_len_B`` (anything after is overwritten);
    returns tokens [B, T]: the prompt followed by the argmax continuation (positions past
    ``prompt_len + max_new`` keep the prompt array's values). ``max_new`` (scalar or per-example
    [B]) may be traced. With ``soft_mask_BxT`` and ``soft_BxTxD`` the model reads the embedding
    ``soft_BxTxD`` at the masked positions instead of the token's (soft-token attacks; the tokens
    there are ignored), and the token embedding everywhere else, generated tokens included.
    Traceable (use it inside jit / vmap); :func:`make_greedy_decoder` gives the jitted version.

    One :func:`kv_cache.prefill` pass over the whole prompt array gives the first token (the logits
    at ``prompt_len - 1`` do not see the array's tail), then each further token is one
    :func:`kv_cache.decode_step` of the token just written (at ``prompt_len + i - 1``, a different
    position per row).
    """
    if (soft_mask_BxT is None) != (soft_BxTxD is None):
        raise ValueError("pass both soft_mask_BxT and soft_BxTxD, or neither")
    B, T = prompt_BxT.shape
    rows_B = jnp.arange(B)
    n_iter = T - jnp.min(prompt_len_B)  # enough for the shortest prompt to reach the end
    n_new_B = None
    if max_new is not None:
        n_new_B = jnp.broadcast_to(jnp.asarray(max_new), (B,))
        n_iter = jnp.minimum(n_iter, jnp.max(n_new_B))

    def write(i, tokens_BxT, logits_BxV):
        """Token i of every continuation (at prompt_len + i) from the logits of the position before."""
        pos_B = prompt_len_B + i
        nxt_B = jnp.argmax(logits_BxV, axis=-1).astype(tokens_BxT.dtype)
        write_B = jnp.clip(pos_B, 0, T - 1)
        keep_B = pos_B >= T
        if n_new_B is not None:
            keep_B |= i >= n_new_B
        nxt_B = jnp.where(keep_B, tokens_BxT[rows_B, write_B], nxt_B)
        return tokens_BxT.at[rows_B, write_B].set(nxt_B)

    if soft_mask_BxT is None:
        emb_BxTxD = model_lib.embed(params, model_cfg, prompt_BxT)
    else:
        emb_BxTxD = embed_with_soft(params, model_cfg, prompt_BxT, soft_mask_BxT, soft_BxTxD)
    logits_BxTxV, cache = kv_cache.prefill(params, model_cfg, emb_BxTxD)
    # Token 0 needs no step. When n_iter <= 0 every row keeps its value (past T or max_new <= 0).
    tokens_BxT = write(0, prompt_BxT, logits_BxTxV[rows_B, jnp.clip(prompt_len_B - 1, 0, T - 1)])

    def body(i, carry):
        tokens_BxT, cache = carry
        prev_B = jnp.clip(prompt_len_B + i - 1, 0, T - 1)  # the position written at iteration i - 1
        token_B = tokens_BxT[rows_B, prev_B]
        if soft_mask_BxT is None:
            logits_BxV, cache = kv_cache.decode_step(params, model_cfg, cache, token_B, prev_B)
        else:  # as embed_with_soft at that position: a soft embedding wherever the mask says so
            emb_BxD = jnp.where(soft_mask_BxT[rows_B, prev_B][:, None], soft_BxTxD[rows_B, prev_B],
                                jnp.take(params["wte"]["embedding"], token_B, axis=0))
            logits_BxV, cache = kv_cache.decode_step(params, model_cfg, cache, pos_B=prev_B, embedding_BxD=emb_BxD)
        return write(i, tokens_BxT, logits_BxV), cache

    return jax.lax.fori_loop(1, n_iter, body, (tokens_BxT, cache))[0]


def embed_with_soft(params, model_cfg, tokens_BxT, soft_mask_BxT, soft_BxTxD):
    """Input embeddings [B, T, D]: ``soft_BxTxD`` where ``soft_mask_BxT``, the token embedding elsewhere."""
    return jnp.where(soft_mask_BxT[..., None], soft_BxTxD, model_lib.embed(params, model_cfg, tokens_BxT))


def make_greedy_decoder(model_cfg: model_lib.ModelConfig, max_new: int | None = None) -> Callable:
    """Jitted ``decode(params, prompt_BxT, prompt_len_B) -> tokens_BxT`` (see :func:`greedy_decode`)."""
    return jax.jit(lambda params, prompt, prompt_len: greedy_decode(params, model_cfg, prompt, prompt_len, max_new))

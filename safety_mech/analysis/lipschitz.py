"""SPEC §10.5: Lipschitzness of the prediction at EOT with respect to the input embeddings.

Score per example: ‖∂ max_v z_v / ∂E‖_F, z = logits at the EOT position (index prompt_len − 1) and
E = the input token embeddings of all positions *before* EOT (positions >= EOT are masked out of the
gradient; the model is causal, so positions after EOT never mattered). The gradient of the max is that
of the argmax logit (ties split the gradient, as ``jnp.max`` does). Positions are added inside
``model.apply``, so the gradient with respect to the token embeddings equals the one with respect to the
block-0 input.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from safety_mech import model
from safety_mech import batching


def max_logit_grad_norm(logits_fn, E_BxTxD, eot_B):
    """‖∂ max_v z_v / ∂E[b, :eot_b]‖_F per example b, z = ``logits_fn(E)[b, eot_b]``, [B].

    ``logits_fn`` maps embeddings [B, T, D] to logits [B, T, V] and must treat examples independently
    (true of a transformer without batch norm): then the gradient of Σ_b max_v z_{b,v} with respect to
    E holds every example's own gradient, one backward pass for the whole batch."""
    B, T, _ = E_BxTxD.shape

    def total_max_logit(E):
        z_BxV = logits_fn(E)[jnp.arange(B), eot_B]
        return z_BxV.max(-1).sum()

    g_BxTxD = jax.grad(total_max_logit)(E_BxTxD)
    before_BxT = jnp.arange(T)[None] < eot_B[:, None]
    return jnp.sqrt(jnp.sum(jnp.where(before_BxT[..., None], g_BxTxD, 0.0) ** 2, axis=(1, 2)))


@functools.partial(jax.jit, static_argnames="model_cfg")
def _scores(params, prompts_BxT, prompt_len_B, *, model_cfg):
    E_BxTxD = model.embed(params, model_cfg, prompts_BxT)
    logits_fn = functools.partial(model.apply, params, model_cfg)
    return max_logit_grad_norm(lambda E: logits_fn(embeddings=E), E_BxTxD, prompt_len_B - 1)


def lipschitz_scores(params, model_cfg: model.ModelConfig, prompts, prompt_len,
                     batch_size: int = 64) -> np.ndarray:
    """SPEC §10.5: [N] float32 NumPy, ‖∂ max_v z_v / ∂E‖_F for each prompt [N, T] (BOS .. EOT, EOT
    at prompt_len − 1; whatever follows EOT is ignored). Jitted, in chunks of ``batch_size``; positions
    after the longest prompt are cut before the forward pass."""
    prompts, prompt_len = np.asarray(prompts), np.asarray(prompt_len)
    if np.any(prompt_len < 1) or np.any(prompt_len > prompts.shape[1]):
        raise ValueError(f"prompt_len must lie in [1, {prompts.shape[1]}] (EOT is at index prompt_len - 1)")
    T = int(prompt_len.max())
    fn = functools.partial(_scores, params, model_cfg=model_cfg)
    return batching.map_arrays(fn, (prompts[:, :T].astype(np.int32), prompt_len.astype(np.int32)), batch_size)

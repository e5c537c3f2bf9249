"""Losses with one shared signature: ``loss_fn(params, ref_params, batch, cfg) -> (loss, aux)``.

``loss`` is a scalar (the mean over examples of a per-example loss), ``aux`` a dict of scalars that the
training step reports as ``train/<name>``. ``ref_params`` is the frozen reference model of DPO (SPEC §8);
losses that do not need it ignore it. ``cfg`` is a :class:`LossConfig` (or any object with the same
attributes, so a fine-tuning method config can extend it).

The completion loss of SPEC §8 for one example with target tokens x[1:] and mask m::

    ℓ_θ(x, m) = Σ_t m_t · CE_t / N,   CE_t = −log p_θ(x_{t+1} | x_{≤t})

with N chosen by ``normalize``:

* ``"tokens"``  N = Σ_t m_t, the number of target tokens of that example (default; pretraining);
* ``"seq_len"`` N = T − 1, the number of predicted positions (REF divides by the sequence length, so
  this is the REF-comparable choice; note T is 115 here and 160 in REF);
* ``"none"``    N = 1, the plain sum.

An example without any target token contributes 0 (N is clamped to at least 1).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from safety_mech import model as model_lib

NORMALIZATIONS = ("tokens", "seq_len", "none")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What :func:`lm_loss` needs: the model config and the normalisation of the completion loss."""

    model: model_lib.ModelConfig
    normalize: str = "tokens"  # "tokens" | "seq_len" | "none"

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={self.normalize!r}; use one of {NORMALIZATIONS}")


def token_cross_entropy(params, model_cfg, tokens_BxT):
    """Next-token cross-entropy and argmax-correctness at every predicted position.

    Returns ``ce_BxTm1`` float32 (−log p of token t+1 given tokens ≤ t) and ``correct_BxTm1`` bool.
    """
    logits_BxTm1xV = model_lib.apply(params, model_cfg, tokens_BxT[:, :-1])
    targets_BxTm1 = tokens_BxT[:, 1:]
    logp_BxTm1xV = jax.nn.log_softmax(logits_BxTm1xV.astype(jnp.float32), axis=-1)
    ce_BxTm1 = -jnp.take_along_axis(logp_BxTm1xV, targets_BxTm1[..., None], axis=-1)[..., 0]
    correct_BxTm1 = jnp.argmax(logits_BxTm1xV, axis=-1) == targets_BxTm1
    return ce_BxTm1, correct_BxTm1


def completion_loss(params, model_cfg, tokens_BxT, mask_BxT, normalize: str = "tokens"):
    """Per-example completion loss ℓ_θ of SPEC §8 (see module docstring) and its token counts.

    ``mask_BxT[b, t]`` marks token t as a target (the ``loss_mask`` convention of data.py), so the
    mask of the predictions is ``mask_BxT[:, 1:]``. Returns ``(loss_B, n_tokens_B, n_correct_B)``.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}; use one of {NORMALIZATIONS}")
    ce_BxTm1, correct_BxTm1 = token_cross_entropy(params, model_cfg, tokens_BxT)
    m_BxTm1 = mask_BxT[:, 1:].astype(jnp.float32)
    n_tokens_B = m_BxTm1.sum(-1)
    total_B = (ce_BxTm1 * m_BxTm1).sum(-1)
    if normalize == "tokens":
        denom_B = jnp.maximum(n_tokens_B, 1.0)
    elif normalize == "seq_len":
        denom_B = jnp.full_like(n_tokens_B, ce_BxTm1.shape[1])
    else:
        denom_B = jnp.ones_like(n_tokens_B)
    n_correct_B = (correct_BxTm1 * m_BxTm1).sum(-1)
    return total_B / denom_B, n_tokens_B, n_correct_B


def lm_loss(params, ref_params: Any, batch: dict, cfg: LossConfig):
    """Masked next-token loss of pretraining: mean over examples of ℓ_θ(tokens, loss_mask).

    ``batch`` needs ``tokens`` [B, T] int and ``loss_mask`` [B, T] bool. ``ref_params`` is unused.
    aux: ``accuracy`` (argmax accuracy over all target tokens of the batch) and ``target_tokens``
    (mean number of target tokens per example).
    """
    del ref_params
    loss_B, n_tokens_B, n_correct_B = completion_loss(
        params, cfg.model, batch["tokens"], batch["loss_mask"], cfg.normalize)
    aux = {"accuracy": n_correct_B.sum() / jnp.maximum(n_tokens_B.sum(), 1.0),
           "target_tokens": n_tokens_B.mean()}
    return loss_B.mean(), aux

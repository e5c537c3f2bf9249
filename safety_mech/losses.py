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
    return _cross_entropy(logits_BxTm1xV, tokens_BxT[:, 1:])


def _cross_entropy(logits_BxNxV, targets_BxN):
    """−log p(target) and argmax correctness at every position."""
    logp_BxNxV = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32), axis=-1)
    ce_BxN = -jnp.take_along_axis(logp_BxNxV, targets_BxN[..., None], axis=-1)[..., 0]
    return ce_BxN, jnp.argmax(logits_BxNxV, axis=-1) == targets_BxN


def normalizer(n_tokens_B, n_positions: int, normalize: str):
    """N of ℓ_θ per example (module docstring): its target-token count (at least 1), the number of
    predicted positions T − 1, or 1."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}; use one of {NORMALIZATIONS}")
    if normalize == "tokens":
        return jnp.maximum(n_tokens_B, 1.0)
    if normalize == "seq_len":
        return jnp.full_like(n_tokens_B, n_positions)
    return jnp.ones_like(n_tokens_B)


def completion_loss(params, model_cfg, tokens_BxT, mask_BxT, normalize: str = "tokens"):
    """Per-example completion loss ℓ_θ of SPEC §8 (see module docstring) and its token counts.

    ``mask_BxT[b, t]`` marks token t as a target (the ``loss_mask`` convention of data.py), so the
    mask of the predictions is ``mask_BxT[:, 1:]``. Returns ``(loss_B, n_tokens_B, n_correct_B)``.
    """
    ce_BxTm1, correct_BxTm1 = token_cross_entropy(params, model_cfg, tokens_BxT)
    m_BxTm1 = mask_BxT[:, 1:].astype(jnp.float32)
    n_tokens_B = m_BxTm1.sum(-1)
    total_B = (ce_BxTm1 * m_BxTm1).sum(-1)
    n_correct_B = (correct_BxTm1 * m_BxTm1).sum(-1)
    return total_B / normalizer(n_tokens_B, ce_BxTm1.shape[1], normalize), n_tokens_B, n_correct_B


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


def packed_lm_loss(params, ref_params: Any, packed: dict, cfg: LossConfig):
    """:func:`lm_loss` of a batch packed by ``packing.pack`` (several examples per row): the same
    value and aux up to float rounding, since every target token carries its example's weight
    1 / (N_b · B) (``packed["weight"]``) and attention stays within each example."""
    del ref_params
    logits_RxNxV = model_lib.apply(params, cfg.model, packed["inputs"], positions=packed["positions"],
                                   segment_ids=packed["segments"])
    ce_RxN, correct_RxN = _cross_entropy(logits_RxNxV, packed["targets"])
    m_RxN = packed["loss_mask"].astype(jnp.float32)
    aux = {"accuracy": (correct_RxN * m_RxN).sum() / jnp.maximum(m_RxN.sum(), 1.0),
           "target_tokens": m_RxN.sum() / packed["n_examples"]}
    return (ce_RxN * packed["weight"]).sum(), aux

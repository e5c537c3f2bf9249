"""Safety fine-tuning losses of SPEC §8.

Every loss has the signature of :func:`losses.lm_loss`, ``loss_fn(params, ref_params, batch, cfg) ->
(loss, aux)``: a per-example loss, then the mean over the batch. ``batch`` is a fine-tuning batch of
``safety_data.sample_finetune_batch`` (``tokens_desired``, ``mask_desired``, ``tokens_undesired``,
``mask_undesired`` [B, T], the masks marking the response tokens; optionally ``unsafe`` [B]); ``cfg``
is a :class:`MethodConfig` whose ``model`` is set.

With ℓ_θ(y) the completion loss of :func:`losses.completion_loss` (Σ_t m_t·CE_t / N, N chosen by
``normalize``; fine-tuning defaults to ``"seq_len"``, REF's normalisation), y_w the desired and y_l the
undesired completion of the same input:

* SSFT:        ℓ_θ(y_w)
* DPO:         −log σ( β_w·[ℓ_ref(y_w) − ℓ_θ(y_w)] − β_l·[ℓ_ref(y_l) − ℓ_θ(y_l)] ), ref frozen;
               REF: β_w = 0.1, β_l = 0.01. The textbook DPO (one β) is ``beta=<β>``, which
               overrides both.
* Unlearning:  w_w·ℓ_θ(y_w) − w_l·ℓ_θ(y_l), REF: w_w = 1, w_l = 0.1 (unbounded below, as REF).

The formulas on per-example ℓ values are the small pure functions :func:`dpo_objective` and
:func:`unlearn_objective` (SSFT is ℓ_θ(y_w) itself).

aux (reported as ``train/<name>``): ``logp_desired`` / ``logp_undesired`` (batch means of −ℓ_θ, i.e.
the normalised log-likelihoods), ``accuracy`` (argmax accuracy over the desired completion's tokens),
``frac_unsafe`` (when the batch has ``unsafe``), and for DPO ``reward_chosen`` = β_w·[ℓ_ref(y_w) −
ℓ_θ(y_w)], ``reward_rejected`` = β_l·[ℓ_ref(y_l) − ℓ_θ(y_l)], ``reward_margin`` (their difference)
and ``reward_accuracy`` (fraction of examples with a positive margin).

Cost per step: every method runs the model on both completions (SSFT only forward on y_l, for the
``logp_undesired`` metric); DPO adds two forward passes of the reference.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from safety_mech import model as model_lib
from safety_mech.losses import NORMALIZATIONS, completion_loss

METHODS = ("ssft", "dpo", "unlearn")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """A fine-tuning method and its hyperparameters (defaults: REF's, SPEC §8). Works as the ``cfg`` of
    the losses once ``model`` is set (it is derived from the base run, never a config key)."""

    name: str = "ssft"  # "ssft" | "dpo" | "unlearn"
    normalize: str = "seq_len"  # completion-loss normalisation: "seq_len" (REF) | "tokens" | "none"
    beta_w: float = 0.1  # DPO: β of the desired (chosen) completion
    beta_l: float = 0.01  # DPO: β of the undesired (rejected) completion
    beta: float | None = None  # DPO: one β for both terms (textbook DPO); overrides beta_w, beta_l
    w_w: float = 1.0  # unlearning: weight of the desired completion's loss
    w_l: float = 0.1  # unlearning: weight of the (ascended) undesired completion's loss
    model: model_lib.ModelConfig | None = None

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"name={self.name!r}; use one of {METHODS}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={self.normalize!r}; use one of {NORMALIZATIONS}")
        for name in ("beta_w", "beta_l", "beta", "w_w", "w_l"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    @property
    def betas(self) -> tuple:
        """(β_w, β_l) as used by DPO."""
        return (self.beta, self.beta) if self.beta is not None else (self.beta_w, self.beta_l)


# ----------------------------------------------------------------------------------------------
# The formulas, on per-example completion losses ℓ
# ----------------------------------------------------------------------------------------------


def dpo_objective(l_w, l_l, ref_l_w, ref_l_l, beta_w: float, beta_l: float):
    """Per-example DPO loss of SPEC §8 from completion losses ℓ (log π = −ℓ) of the policy and the
    reference. Returns ``(loss, reward_chosen, reward_rejected)``; the loss is −log σ(margin) computed
    with ``log_sigmoid`` (finite for any margin)."""
    reward_chosen = beta_w * (ref_l_w - l_w)
    reward_rejected = beta_l * (ref_l_l - l_l)
    return -jax.nn.log_sigmoid(reward_chosen - reward_rejected), reward_chosen, reward_rejected


def unlearn_objective(l_w, l_l, w_w: float, w_l: float):
    """Per-example unlearning loss of SPEC §8: descent on y_w, ascent on y_l (no lower bound)."""
    return w_w * l_w - w_l * l_l


# ----------------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------------


def _completion_pair(params, cfg: MethodConfig, batch: dict):
    """ℓ of the desired and undesired completions in one forward pass over the 2B sequences.
    Returns ``(l_w_B, l_l_B, n_tokens_w_B, n_correct_w_B)``."""
    B = batch["tokens_desired"].shape[0]
    tokens_2BxT = jnp.concatenate([batch["tokens_desired"], batch["tokens_undesired"]])
    mask_2BxT = jnp.concatenate([batch["mask_desired"], batch["mask_undesired"]])
    l_2B, n_2B, correct_2B = completion_loss(params, cfg.model, tokens_2BxT, mask_2BxT, cfg.normalize)
    return l_2B[:B], l_2B[B:], n_2B[:B], correct_2B[:B]


def _aux(l_w_B, l_l_B, n_w_B, correct_w_B, batch) -> dict:
    aux = {"logp_desired": -l_w_B.mean(), "logp_undesired": -l_l_B.mean(),
           "accuracy": correct_w_B.sum() / jnp.maximum(n_w_B.sum(), 1.0)}
    if "unsafe" in batch:
        aux["frac_unsafe"] = batch["unsafe"].astype(jnp.float32).mean()
    return aux


def ssft_loss(params, ref_params: Any, batch: dict, cfg: MethodConfig):
    """Supervised safety fine-tuning: mean of ℓ_θ(y_desired). ``ref_params`` is unused."""
    del ref_params
    l_w, n_w, correct_w = completion_loss(params, cfg.model, batch["tokens_desired"], batch["mask_desired"],
                                          cfg.normalize)
    # y_l only feeds the logp_undesired metric: no gradient, so no backward pass through it
    l_l, _, _ = completion_loss(jax.lax.stop_gradient(params), cfg.model, batch["tokens_undesired"],
                                batch["mask_undesired"], cfg.normalize)
    return l_w.mean(), _aux(l_w, l_l, n_w, correct_w, batch)


def dpo_loss(params, ref_params: Any, batch: dict, cfg: MethodConfig):
    """DPO with REF's two β (or one, ``cfg.beta``) against the frozen reference ``ref_params``
    (stop_gradient: no gradient ever reaches the reference)."""
    if ref_params is None:
        raise ValueError("dpo_loss needs ref_params (the frozen reference model)")
    l_w, l_l, n_w, correct_w = _completion_pair(params, cfg, batch)
    ref_w, ref_l, _, _ = _completion_pair(jax.lax.stop_gradient(ref_params), cfg, batch)
    loss_B, chosen_B, rejected_B = dpo_objective(l_w, l_l, ref_w, ref_l, *cfg.betas)
    margin_B = chosen_B - rejected_B
    aux = _aux(l_w, l_l, n_w, correct_w, batch)
    aux.update(reward_chosen=chosen_B.mean(), reward_rejected=rejected_B.mean(), reward_margin=margin_B.mean(),
               reward_accuracy=(margin_B > 0).astype(jnp.float32).mean())
    return loss_B.mean(), aux


def unlearn_loss(params, ref_params: Any, batch: dict, cfg: MethodConfig):
    """Unlearning: mean of w_w·ℓ_θ(y_w) − w_l·ℓ_θ(y_l). ``ref_params`` is unused."""
    del ref_params
    l_w, l_l, n_w, correct_w = _completion_pair(params, cfg, batch)
    return unlearn_objective(l_w, l_l, cfg.w_w, cfg.w_l).mean(), _aux(l_w, l_l, n_w, correct_w, batch)


LOSSES = {"ssft": ssft_loss, "dpo": dpo_loss, "unlearn": unlearn_loss}

"""Evaluation: greedy decoding, generation exact match, and the Instruct metric used by training.

Greedy decoding runs at a fixed shape: the prompt array [B, T] (BOS..EOT then PAD) is filled in
place, one position per iteration, at ``prompt_len + i`` for every example at once; causal attention
makes the PAD tail invisible to earlier positions, so no cache is needed for correctness (each
iteration is one full forward pass; a KV cache would only save compute).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from safety_mech import data as data_lib
from safety_mech import losses
from safety_mech import model as model_lib
from safety_mech import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation during and after training."""

    seed: int = 1234  # key of the held-out evaluation sets (training data uses train.seed)
    n_periodic: int = 256  # examples per set at every eval_every
    n_final: int = 1000  # examples per set in the final evaluation (SPEC §9: >= 1000)
    batch_size: int = 500  # examples decoded at once
    sets: tuple = ("safe",)

    def __post_init__(self):
        object.__setattr__(self, "sets", tuple(self.sets))
        for name in ("n_periodic", "n_final", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [s for s in self.sets if s not in data_lib.EVAL_SETS]
        if unknown:
            raise ValueError(f"unknown evaluation set(s) {unknown}; choose from {data_lib.EVAL_SETS}")


def greedy_decode(params, model_cfg: model_lib.ModelConfig, prompt_BxT, prompt_len_B, max_new: int | None = None):
    """Greedy continuation of every prompt up to the end of the array (or ``max_new`` tokens).

    ``prompt_BxT`` holds each prompt in positions ``< prompt_len_B`` (anything after is overwritten);
    returns tokens [B, T]: the prompt followed by the argmax continuation (positions past
    ``prompt_len + max_new`` keep the prompt array's values). ``max_new`` (scalar or per-example
    [B]) may be traced. Traceable (use it inside jit / vmap); :func:`make_greedy_decoder` gives the
    jitted version.
    """
    B, T = prompt_BxT.shape
    rows_B = jnp.arange(B)
    n_iter = T - jnp.min(prompt_len_B)  # enough for the shortest prompt to reach the end
    n_new_B = None
    if max_new is not None:
        n_new_B = jnp.broadcast_to(jnp.asarray(max_new), (B,))
        n_iter = jnp.minimum(n_iter, jnp.max(n_new_B))

    def body(i, tokens_BxT):
        logits_BxTxV = model_lib.apply(params, model_cfg, tokens_BxT)
        pos_B = prompt_len_B + i  # the position written at this iteration
        nxt_B = jnp.argmax(logits_BxTxV[rows_B, jnp.clip(pos_B - 1, 0, T - 1)], axis=-1).astype(tokens_BxT.dtype)
        write_B = jnp.clip(pos_B, 0, T - 1)
        keep_B = pos_B >= T
        if n_new_B is not None:
            keep_B |= i >= n_new_B
        nxt_B = jnp.where(keep_B, tokens_BxT[rows_B, write_B], nxt_B)
        return tokens_BxT.at[rows_B, write_B].set(nxt_B)

    return jax.lax.fori_loop(0, n_iter, body, prompt_BxT)


def make_greedy_decoder(model_cfg: model_lib.ModelConfig, max_new: int | None = None) -> Callable:
    """Jitted ``decode(params, prompt_BxT, prompt_len_B) -> tokens_BxT`` (see :func:`greedy_decode`)."""
    return jax.jit(lambda params, prompt, prompt_len: greedy_decode(params, model_cfg, prompt, prompt_len, max_new))


def gen_exact_match(decoded_BxT, tokens_target_BxT, gov_mask_BxT):
    """Per example: the decoded sequence equals the target on every governed position (bool [B])."""
    return jnp.all((decoded_BxT == tokens_target_BxT) | ~gov_mask_BxT, axis=-1)


def _instruct_metrics(params, model_cfg, ev):
    """Per-example Instruct metrics of one chunk of an evaluation set (true output as target)."""
    # decode only as far as the governed segments reach (saves ~20% of the forward passes)
    T = ev["prompt"].shape[1]
    last_B = jnp.max(jnp.where(ev["gov_mask_true"], jnp.arange(T), 0), axis=-1)
    decoded = greedy_decode(params, model_cfg, ev["prompt"], ev["prompt_len"], last_B + 1 - ev["prompt_len"])
    gen = gen_exact_match(decoded, ev["tokens_true"], ev["gov_mask_true"])
    _, correct_BxTm1 = losses.token_cross_entropy(params, model_cfg, ev["tokens_true"])
    m_BxTm1 = ev["gov_mask_true"][:, 1:]
    return {"gen_instruct": gen,
            "tf_instruct": jnp.all(correct_BxTm1 | ~m_BxTm1, axis=-1),
            "tf_correct": (correct_BxTm1 & m_BxTm1).sum(-1), "tf_count": m_BxTm1.sum(-1)}


def make_instruct_eval(model_cfg: model_lib.ModelConfig, data_cfg: data_lib.DataConfig, key, n: int, *,
                       sets=("safe",), chunk: int = 500, n_replicas: int = 1, mesh=None) -> Callable:
    """``eval_fn(params, n_examples=n) -> metrics`` on the first ``n_examples`` of ``n`` held-out
    examples of each set (sampled once from ``key``, so periodic and final evaluations share one
    compiled sampler and decoder):

    * ``eval/<set>/gen_instruct``: greedy decoding reproduces the true output (exact match of the
      governed segment; SPEC §9 "Instruct");
    * ``eval/<set>/tf_instruct``: teacher-forced argmax matches the whole governed segment;
    * ``eval/<set>/tf_token_acc``: teacher-forced per-token accuracy on the governed segment.

    Examples are processed in chunks of ``chunk``, split over ``mesh``'s devices when it divides the
    chunk (params may be replicated on the mesh; the examples are kept on the host between chunks).
    Values are floats, or [R] arrays for stacked replica params (``n_replicas > 1``).
    """
    chunk = min(chunk, n)
    n_pad = -n % chunk
    split = mesh is not None and chunk % mesh.size == 0

    def metrics_fn(params, ev):
        if split:
            ev = sharding_lib.constrain_batch(ev, mesh)
        return _instruct_metrics(params, model_cfg, ev)

    if n_replicas > 1:
        metrics_fn = jax.vmap(metrics_fn, in_axes=(0, None))
    metrics_fn = jax.jit(metrics_fn)
    keep = ("prompt", "prompt_len", "tokens_true", "gov_mask_true")
    data = {}
    for name in sets:  # each set's key depends on its name only, not on which other sets are asked for
        set_key = jax.random.fold_in(key, data_lib.EVAL_SETS.index(name))
        ev = jax.device_get(data_lib.sample_eval_set(set_key, data_cfg, name, n))
        # pad by repeating the first examples; padded results are dropped below
        data[name] = {k: np.concatenate([ev[k], ev[k][:n_pad]]) for k in keep}

    def eval_fn(params, n_examples: int = n) -> dict:
        if not 1 <= n_examples <= n:
            raise ValueError(f"n_examples={n_examples} outside [1, {n}]")
        out = {}
        for name, ev in data.items():
            parts = [metrics_fn(params, {k: v[s:s + chunk] for k, v in ev.items()})
                     for s in range(0, n_examples, chunk)]
            m = {k: np.concatenate([np.asarray(p[k]) for p in parts], axis=-1)[..., :n_examples] for k in parts[0]}
            out[f"eval/{name}/gen_instruct"] = m["gen_instruct"].mean(-1)
            out[f"eval/{name}/tf_instruct"] = m["tf_instruct"].mean(-1)
            out[f"eval/{name}/tf_token_acc"] = m["tf_correct"].sum(-1) / np.maximum(m["tf_count"].sum(-1), 1)
        return out

    return eval_fn

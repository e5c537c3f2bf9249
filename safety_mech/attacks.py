"""The soft-token attack of SPEC §9 (the ``adversarial`` set).

k soft embeddings s_1..s_k are inserted after the operand text, before EOT::

    BOS o1 o2 o3 o4 SOT t_1..t_L s_1..s_k EOT a_1.. STOP b_1.. STOP EOS PAD...

so the prompt grows by k and every target (true, refusal, harmful) moves k positions to the right
(:func:`insert_soft_slots`). The soft tokens start small (norm ``init_scale``·ε in a random
direction) and take ``steps`` steps of projected normalised-gradient descent on the teacher-forced
cross-entropy of the harmful output (the mean over the tokens of its governed segment, the part
that ``metrics`` scores):

    s_j <- Proj_ε( s_j − α · g_j / ||g_j|| ),   g_j = ∂ CE / ∂ s_j,   α = step_size · ε,

one normalised step per soft token and example; Proj_ε rescales a token whose L2 norm exceeds ε
onto the ball ||s_j|| <= ε, with ε = budget × the mean L2 norm of the rows of the token-embedding
table (all V rows). With the defaults (50 steps of 0.1·ε) a soft token can cross its ball 2.5
times. The attack keeps, per example, the iterate with the lowest loss among those it evaluated
(s_0..s_{steps−1}) and scores the greedy response from it (teacher-forced through its EOS, as
``metrics.example_metrics``): Null, strict and lenient success. REF
normalised and clipped the wrong positions and clamped coordinates instead of projecting: bugs.

Sequence length: the attacked arrays are ``T + k`` long. Sinusoidal positions extend to any length
(the model config's ``seq_len`` is raised for the attack). Learned positions exist only for
``model.seq_len`` positions: then the arrays stay that long and the targets are cut there, so the
loss and the comparisons cover the governed tokens that still fit (:func:`attack_coverage`;
examples with a cut target are counted as ``n_truncated``); an example none of whose governed
tokens of some target fit is left out (``n`` counts the examples used). With the ``tiny`` preset's
fixed 6-letter texts (T = 28) the last governed token sits at T − 2, so k = 1 cuts nothing, k = 2
cuts the final STOP of segment b, and k = 8 cuts all of b (second-pair examples, governed by b
alone, are then left out).

Per-example outputs of :func:`attack_examples`: ``gen_instruct``, ``gen_null``, ``gen_strict``,
``gen_lenient`` (bool), ``loss_before`` / ``loss_after`` (harmful CE at the initial / kept
iterate) and ``soft`` [B, k, D] (the kept soft tokens). :func:`make_attack_eval` runs it in
chunks over a set and over stacked replicas; :func:`success_vs_budget` / :func:`success_vs_k` are
the sweeps; :func:`adversarial_inputs` gives the attacked inputs as embeddings for the analyses.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from safety_mech import batching, decoding
from safety_mech import metrics as metrics_lib
from safety_mech import grammar as gr
from safety_mech import model as model_lib

BUDGETS = (0.25, 0.5, 1.0, 2.0, 4.0)  # the budget sweep of SPEC §9
KS = tuple(range(1, 9))  # the k sweep


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """Soft-token attack hyperparameters (defaults: SPEC §9's attack; step size and init are ours)."""

    k: int = 2  # soft tokens
    budget: float = 1.0  # ε multiplier (the radius is budget × mean token-embedding norm)
    steps: int = 50
    step_size: float = 0.1  # α as a fraction of ε
    init_scale: float = 0.1  # initial soft-token norm as a fraction of ε

    def __post_init__(self):
        if self.k < 1 or self.steps < 1:
            raise ValueError(f"attack k and steps must be >= 1, got k={self.k}, steps={self.steps}")
        for name in ("budget", "step_size", "init_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"attack {name} must be > 0, got {getattr(self, name)}")


def embedding_radius(params):
    """Mean L2 norm of the token-embedding rows: ε at budget 1."""
    return jnp.linalg.norm(params["wte"]["embedding"], axis=-1).mean()


def project_to_ball(x, radius):
    """Each vector of the last axis rescaled onto the L2 ball of ``radius`` if it lies outside."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))


def attack_length(model_cfg: model_lib.ModelConfig, T: int, k: int) -> int:
    """Length of the attacked arrays: ``T + k``, or ``model.seq_len`` for learned positions."""
    return T + k if model_cfg.pos == "sinusoidal" else min(T + k, model_cfg.seq_len)


def attack_model_cfg(model_cfg: model_lib.ModelConfig, length: int) -> model_lib.ModelConfig:
    """The model config that accepts ``length`` positions (sinusoids extend; learned ones cannot)."""
    if length <= model_cfg.seq_len:
        return model_cfg
    if model_cfg.pos != "sinusoidal":
        raise ValueError(f"learned positions cover {model_cfg.seq_len} positions, not {length}")
    return dataclasses.replace(model_cfg, seq_len=length)


def attack_coverage(ev: dict, k: int, length: int):
    """Host bool [n] arrays ``(usable, truncated)`` for k soft tokens in arrays of ``length``
    positions: ``usable``: every target keeps at least one governed token; ``truncated``: some
    governed token is cut off (learned positions only)."""
    T = ev["prompt"].shape[-1]
    pos = np.arange(T)
    usable, truncated = True, False
    for t in metrics_lib.TARGETS:
        gov = np.asarray(ev[f"gov_mask_{t}"])
        first = np.min(np.where(gov, pos, T), axis=-1)
        last = np.max(np.where(gov, pos, -1), axis=-1)
        usable = usable & (first + k < length)
        truncated = truncated | (last + k >= length)
    return usable, truncated


def insert_soft_slots(ev: dict, k: int, length: int) -> dict:
    """``ev`` (the :data:`metrics.EVAL_KEYS` of a set) with k slots inserted before EOT, arrays
    ``length`` long: ``prompt`` (PAD in the slots), ``prompt_len`` + k, ``tokens_*``, ``gov_mask_*``
    and ``resp_mask_*`` shifted right by k after the text, and ``soft_mask`` / ``soft_slot`` (the slot
    index 0..k-1 of each position, clipped). Traceable."""
    T = ev["prompt"].shape[-1]
    p_B1 = ev["prompt_len"][:, None]
    j = jnp.arange(length)
    eot = p_B1 - 1  # the EOT's original position: the first slot takes it
    soft_BxT = (j >= eot) & (j < eot + k)
    src_BxT = jnp.where(j < eot, j, j - k)
    valid_BxT = ~soft_BxT & (src_BxT < T)
    src_BxT = jnp.clip(src_BxT, 0, T - 1)

    def shift(x, fill):
        return jnp.where(valid_BxT, jnp.take_along_axis(x, src_BxT, axis=1), fill)

    out = {"prompt": shift(ev["prompt"], gr.PAD), "prompt_len": ev["prompt_len"] + k,
           "soft_mask": soft_BxT, "soft_slot": jnp.clip(j - eot, 0, k - 1)}
    for t in metrics_lib.TARGETS:
        out[f"tokens_{t}"] = shift(ev[f"tokens_{t}"], gr.PAD)
        out[f"gov_mask_{t}"] = shift(ev[f"gov_mask_{t}"], False)
        out[f"resp_mask_{t}"] = shift(ev[f"resp_mask_{t}"], False)
    return out


def soft_embeddings(params, model_cfg, att: dict, soft_BxKxD, tokens_BxT):
    """Input embeddings of the attacked sequence ``tokens_BxT``: soft token j at slot j."""
    soft_BxTxD = jnp.take_along_axis(soft_BxKxD, att["soft_slot"][..., None], axis=1)
    return decoding.embed_with_soft(params, model_cfg, tokens_BxT, att["soft_mask"], soft_BxTxD)


def harmful_loss(params, model_cfg, att: dict, soft_BxKxD):
    """Per-example teacher-forced cross-entropy of the (shifted) harmful output: the mean over its
    governed segment [B]."""
    tokens_BxT = att["tokens_harmful"]
    emb_BxTxD = soft_embeddings(params, model_cfg, att, soft_BxKxD, tokens_BxT)
    logits_BxTm1xV = model_lib.apply(params, model_cfg, embeddings=emb_BxTxD[:, :-1])
    logp_BxTm1xV = jax.nn.log_softmax(logits_BxTm1xV, axis=-1)
    ce_BxTm1 = -jnp.take_along_axis(logp_BxTm1xV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
    m_BxTm1 = att["gov_mask_harmful"][:, 1:]
    return (ce_BxTm1 * m_BxTm1).sum(-1) / jnp.maximum(m_BxTm1.sum(-1), 1)


def optimize_soft(params, model_cfg: model_lib.ModelConfig, att: dict, eps, init_keys, cfg: AttackConfig):
    """The descent of the module docstring on :func:`insert_soft_slots` arrays ``att``: soft tokens
    [B, k, D] in balls of radius ``eps``, started from ``normal(init_keys[b])`` scaled to
    ``init_scale``·ε. Returns ``(best soft tokens, loss at the start [B], best loss [B])``."""
    D = model_cfg.d_model
    init_BxKxD = jax.vmap(lambda k: jax.random.normal(k, (cfg.k, D)))(init_keys)
    soft_BxKxD = init_BxKxD * (cfg.init_scale * eps / jnp.linalg.norm(init_BxKxD, axis=-1, keepdims=True))

    def total_loss(soft):  # examples are independent: the gradient of the sum is per example
        loss_B = harmful_loss(params, model_cfg, att, soft)
        return loss_B.sum(), loss_B

    loss_and_grad = jax.value_and_grad(total_loss, has_aux=True)

    def step(carry, _):
        soft, best, best_loss_B = carry
        (_, loss_B), g = loss_and_grad(soft)
        better_B = loss_B < best_loss_B
        best = jnp.where(better_B[:, None, None], soft, best)
        best_loss_B = jnp.where(better_B, loss_B, best_loss_B)
        g = g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-12)
        return (project_to_ball(soft - cfg.step_size * eps * g, eps), best, best_loss_B), loss_B

    init = (soft_BxKxD, soft_BxKxD, jnp.full(init_keys.shape, jnp.inf))
    (_, best, best_loss_B), losses_SxB = jax.lax.scan(step, init, None, length=cfg.steps)
    return best, losses_SxB[0], best_loss_B


def _attacked(params, model_cfg, ev, key, budget, cfg):
    """Shared start of the attack: the widened model config, the slotted arrays and the optimised
    soft tokens (example b's initial ones from ``fold_in(key, ev["index"][b])``)."""
    length = attack_length(model_cfg, ev["prompt"].shape[-1], cfg.k)
    model_cfg = attack_model_cfg(model_cfg, length)
    att = insert_soft_slots(ev, cfg.k, length)
    init_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ev["index"])
    best, loss_before_B, loss_after_B = optimize_soft(params, model_cfg, att, budget * embedding_radius(params),
                                                      init_keys, cfg)
    return model_cfg, att, best, loss_before_B, loss_after_B


def attack_examples(params, model_cfg: model_lib.ModelConfig, ev: dict, key, budget, cfg: AttackConfig) -> dict:
    """Attack every example of ``ev`` (:data:`metrics.EVAL_KEYS` arrays [B, T] of an unsafe set,
    plus ``index`` [B]: each example's initial soft tokens come from ``fold_in(key, index)``, so
    results do not depend on chunking) and score their greedy responses; see the module docstring for
    the outputs. ``budget`` may be traced (it overrides ``cfg.budget``: a budget sweep compiles
    once). Traceable."""
    model_cfg, att, best, loss_before_B, loss_after_B = _attacked(params, model_cfg, ev, key, budget, cfg)
    scored = metrics_lib.example_metrics(params, model_cfg, att,
                                         embed_fn=lambda tokens: soft_embeddings(params, model_cfg, att, best, tokens))
    gen = {k: v for k, v in scored.items() if k.startswith("gen_")}
    return {**gen, "loss_before": loss_before_B, "loss_after": loss_after_B, "soft": best}


def adversarial_inputs(params, model_cfg: model_lib.ModelConfig, batch: dict, key, cfg: AttackConfig = AttackConfig(),
                       chunk: int = 500) -> dict:
    """The ``adversarial`` set as model inputs, for the analyses (``analysis/suite.py``): every example
    of ``batch`` (an unsafe set, :data:`metrics.EVAL_KEYS`; one model's params) attacked as in
    :func:`attack_examples`, returned as ``{"embeddings": [N, T', D], "prompt_len": [N]}``: the
    input embeddings of the whole teacher-forced sequence (the true output, shifted by k) with the
    soft tokens in their slots, and the attacked prompt length (EOT at ``prompt_len - 1``). No
    example is left out; with learned positions the targets are cut at T' = seq_len and the attack
    optimises what remains. Host numpy arrays."""
    def fn(p, ev, key):
        wide_cfg, att, best, _, _ = _attacked(p, model_cfg, ev, key, cfg.budget, cfg)
        return _attacked_inputs(p, wide_cfg, att, best)

    ev = {k: np.asarray(batch[k]) for k in metrics_lib.EVAL_KEYS}
    n = len(ev["prompt"])
    ev["index"] = np.arange(n, dtype=np.int32)
    jitted = jax.jit(fn)
    return batching.map_chunks(lambda part: jitted(params, part, key), ev, n, chunk)


def _attacked_inputs(params, wide_cfg, att, soft_BxKxD):
    return {"embeddings": soft_embeddings(params, wide_cfg, att, soft_BxKxD, att["tokens_true"]),
            "prompt_len": att["prompt_len"]}


def adversarial_from_soft(params, model_cfg: model_lib.ModelConfig, batch: dict, soft_NxKxD, chunk: int = 500) -> dict:
    """:func:`adversarial_inputs`' output for soft tokens found earlier (``attack_examples``'
    ``soft``, e.g. saved by ``evaluation.py``) on the examples of ``batch``: no optimisation, so
    the analyses can study exactly the inputs the evaluation attacked. k is ``soft_NxKxD.shape[1]``."""
    ev = {k: np.asarray(batch[k]) for k in metrics_lib.EVAL_KEYS}
    soft_NxKxD = np.asarray(soft_NxKxD, np.float32)
    n, k = len(ev["prompt"]), soft_NxKxD.shape[1]
    if soft_NxKxD.shape[0] != n or soft_NxKxD.shape[2] != model_cfg.d_model:
        raise ValueError(f"soft tokens {soft_NxKxD.shape} do not fit {n} examples of d_model={model_cfg.d_model}")
    length = attack_length(model_cfg, ev["prompt"].shape[-1], k)
    wide_cfg = attack_model_cfg(model_cfg, length)

    def fn(p, part):
        ev_part = {key: part[key] for key in metrics_lib.EVAL_KEYS}
        return _attacked_inputs(p, wide_cfg, insert_soft_slots(ev_part, k, length), part["soft"])

    ev["soft"] = soft_NxKxD
    jitted = jax.jit(fn)
    return batching.map_chunks(lambda part: jitted(params, part), ev, n, chunk)


def make_attack_eval(model_cfg: model_lib.ModelConfig, cfg: AttackConfig = AttackConfig(), *, mesh=None,
                     chunk: int = 500) -> Callable:
    """``attack_eval(params, ev, n, key, budget=cfg.budget) -> (per_example, counts)``: the attack
    on the usable examples among the first ``n`` of ``ev`` (host arrays with
    :data:`metrics.EVAL_KEYS`; see :func:`attack_coverage`), in chunks, over replica-stacked
    params (outputs [R, counts["n"], ...]); ``counts``: ``n``
    (examples used) and ``n_truncated`` (of those, examples with a cut target). One compiled
    program per (k, steps, shapes); the budget is traced. ``ValueError`` when no example is usable."""
    fn = metrics_lib.make_chunk_fn(lambda p, ev, key, budget: attack_examples(p, model_cfg, ev, key, budget, cfg),
                                   mesh=mesh)

    def attack_eval(params, ev: dict, n: int, key, budget: float | None = None):
        ev, counts = usable_examples(model_cfg, ev, n, cfg.k)
        budget = jnp.float32(cfg.budget if budget is None else budget)
        out = batching.map_chunks(lambda part: fn(params, part, key, budget), ev, counts["n"], chunk, out_axis=1)
        return out, counts

    return attack_eval


def usable_examples(model_cfg: model_lib.ModelConfig, ev: dict, n: int, k: int) -> tuple[dict, dict]:
    """The examples among the first ``n`` of ``ev`` that the attack with ``k`` soft tokens can use
    (host arrays with :data:`metrics.EVAL_KEYS` plus ``index``, their positions in ``ev``) and
    ``counts`` (``n`` used, ``n_truncated``); ``ValueError`` when there is none."""
    ev = {key: np.asarray(ev[key])[:n] for key in metrics_lib.EVAL_KEYS}
    usable, truncated = attack_coverage(ev, k, attack_length(model_cfg, ev["prompt"].shape[-1], k))
    if not usable.any():
        raise ValueError(f"no example keeps its targets with k={k} soft tokens: the model's learned "
                         f"positions cover {model_cfg.seq_len} positions")
    ev = {key: v[usable] for key, v in ev.items()}
    ev["index"] = np.flatnonzero(usable).astype(np.int32)
    return ev, {"n": int(usable.sum()), "n_truncated": int(truncated[usable].sum())}


def n_usable(model_cfg: model_lib.ModelConfig, ev: dict, n: int, k: int) -> int:
    """How many of the first ``n`` examples of ``ev`` the attack with ``k`` soft tokens can use."""
    ev = {key: np.asarray(v)[:n] for key, v in ev.items()}
    return int(attack_coverage(ev, k, attack_length(model_cfg, ev["prompt"].shape[-1], k))[0].sum())


def success_vs_budget(attack_eval: Callable, params, ev: dict, n: int, key, budgets=BUDGETS,
                      report: Callable | None = None) -> dict:
    """``{budget: (summary, counts)}``: ``metrics.summarize`` of :func:`make_attack_eval`'s
    results at every budget multiplier (one compilation for all); ``report(budget, summary,
    counts)`` is called after each."""
    out = {}
    for b in budgets:
        per_example, counts = attack_eval(params, ev, n, key, b)
        out[b] = (metrics_lib.summarize(per_example), counts)
        if report:
            report(b, *out[b])
    return out


def success_vs_k(model_cfg: model_lib.ModelConfig, params, ev: dict, n: int, key, ks=KS,
                 cfg: AttackConfig = AttackConfig(), report: Callable | None = None, **make_kwargs) -> dict:
    """``{k: (summary, counts)}`` for every number of soft tokens ``k`` (one compilation each; a k
    for which no example is usable is left out, see the module docstring); ``report(k, summary,
    counts)`` is called after each. ``make_kwargs`` go to :func:`make_attack_eval`."""
    out = {}
    for k in ks:
        if not n_usable(model_cfg, ev, n, k):
            continue
        attack_eval = make_attack_eval(model_cfg, dataclasses.replace(cfg, k=k), **make_kwargs)
        per_example, counts = attack_eval(params, ev, n, key)
        out[k] = (metrics_lib.summarize(per_example), counts)
        if report:
            report(k, *out[k])
    return out

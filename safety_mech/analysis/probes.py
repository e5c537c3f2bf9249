"""Is the information a refusal needs in the model? Linear probes of the residual stream, and the
input splits of a fine-tuned model's Null / Instruct.

Probes (:func:`probe_accuracies`): held-out accuracy of logistic regressions
(:func:`logistic_probe_accuracy`) on :func:`probe_features`, each block's residual output
(``resid_out``) at the EOT (the position that decides the first governed token) and averaged over the
text positions, for two labels of freshly sampled ``unsafe`` + ``safe`` evaluation inputs (equal mix):
"unsafe vs safe" and the text's grammar branch. They say whether the decision's inputs are linearly
readable at all; they work on any params (a base model, or one replica of a fine-tuned run:
``replicas.select``).

Splits (:func:`breakdown_groups`, :func:`rate_table`) of an evaluation set, for per-example metrics
such as ``gen_null`` (``metrics.make_set_eval``):

* the text's branch (safe-dominant 0, unsafe-dominant 1): on unsafe-dominant text most operators are
  unsafe only *because of the branch*, so a model that cannot read the branch refuses there less;
* for unsafe inputs, how many operators of the governing pair (pair 1, or pair 2 in the "second pair"
  case) are unsafe on *both* branches of the text's PCFG (:func:`always_unsafe_in_governing_pair`):
  with none, refusing needs the branch;
* the PCFG, the second-pair case, and optionally bins of the Bayes posterior P(unsafe | text, ops)
  (``analysis.bayes``): failures at a posterior near 1 are the model's, not the data's.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from safety_mech import batching, metrics
from safety_mech import data as data_lib
from safety_mech import model as model_lib
from safety_mech.analysis import activations

# keys of an evaluation set (metrics.sample_eval_data) that breakdown_groups reads
GROUP_KEYS = ("text", "ops", "branch", "pcfg", "second_pair")
PROBE_KEYS = ("prompt", "prompt_len", "branch", "unsafe")  # what probe_accuracies samples
POSTERIOR_BINS = (0.0, 0.2, 0.5, 0.8, 0.95, 1.0)
TEXT_START = 6  # first text position of a prompt: BOS o1 o2 o3 o4 SOT t_1 .. t_L EOT (data.py)


# ----------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="model_cfg")
def _text_mean(params, tokens_BxT, prompt_len_B, *, model_cfg):
    """[L, B, D]: each block's residual output averaged over the text positions TEXT_START .. EOT − 1."""
    _, acts = model_lib.apply(params, model_cfg, tokens_BxT, capture=True)
    j = jnp.arange(tokens_BxT.shape[1])[None]
    text_BxT = (j >= TEXT_START) & (j < prompt_len_B[:, None] - 1)
    total = (acts["resid_out"] * text_BxT[None, :, :, None]).sum(2)
    return total / jnp.maximum(text_BxT.sum(1), 1)[None, :, None]


def probe_features(params, model_cfg: model_lib.ModelConfig, ev: dict, chunk: int = 1000) -> np.ndarray:
    """[n, 2·L·D] float64 features of the prompts ``ev["prompt"]`` [n, T] (``ev["prompt_len"]`` [n]):
    block 0 .. L−1's residual output at the EOT (``activations.collect_window``, site ``resid_out``),
    then block 0 .. L−1's residual output averaged over the text positions. ``params``: one model
    (no replica axis). Run in chunks of ``chunk`` prompts."""
    prompt, prompt_len = np.asarray(ev["prompt"]), np.asarray(ev["prompt_len"])
    if np.any(prompt_len < TEXT_START + 2):
        raise ValueError(f"every prompt needs a text (prompt_len >= {TEXT_START + 2}), got min {prompt_len.min()}")
    at_eot = activations.collect_window(params, model_cfg, prompt, prompt_len, site="resid_out", positions=1,
                                        batch_size=chunk)[:, :, 0]  # [L, n, D]
    T = int(prompt_len.max())
    mean_text = batching.map_arrays(functools.partial(_text_mean, params, model_cfg=model_cfg),
                                    (prompt[:, :T].astype(np.int32), prompt_len.astype(np.int32)), chunk,
                                    out_axis=1)  # [L, n, D]
    return np.concatenate([*at_eot, *mean_text], axis=-1).astype(np.float64)


def logistic_probe_accuracy(x, y, train_frac: float = 0.8, iters: int = 25, l2: float = 1.0,
                            seed: int | None = 0) -> float:
    """Held-out accuracy of an L2-regularised logistic regression of bool ``y`` [n] on ``x`` [n, d]:
    the examples are shuffled (``np.random.default_rng(seed)``; ``seed=None`` keeps their order), the
    first ``train_frac`` fit it (features standardised on them; Newton's method, which converges in a
    few iterations at these sizes; penalty ``l2``·‖w‖²/2), the rest score it."""
    x, y = np.asarray(x, np.float64), np.asarray(y).astype(bool)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"need x [n, d] and y [n], got {x.shape} and {y.shape}")
    n_train = int(len(y) * train_frac)
    if not 1 <= n_train < len(y):
        raise ValueError(f"train_frac={train_frac} of {len(y)} examples leaves no training or no held-out part")
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(y))
        x, y = x[order], y[order]
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = np.c_[(x - mu) / sd, np.ones(len(x))]
    a, t = x[:n_train], y[:n_train].astype(np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -30, 30)))
        hessian = (a * (p * (1 - p))[:, None]).T @ a + l2 * np.eye(len(w))
        step = np.linalg.solve(hessian, a.T @ (p - t) + l2 * w)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return float(np.mean((x[n_train:] @ w > 0) == y[n_train:]))


def probe_accuracies(params, model_cfg: model_lib.ModelConfig, data_cfg: data_lib.DataConfig, n: int = 10_000,
                     seed: int = 0, chunk: int = 1000) -> dict:
    """Held-out probe accuracies on ``n`` fresh ``unsafe`` and ``n`` fresh ``safe`` inputs
    (``metrics.sample_eval_data`` from ``key(seed)``; shuffled by ``seed``) of one model's
    :func:`probe_features`: ``{"unsafe_vs_safe", "text_branch", "n" (inputs), "features"}``. Chance
    is about 0.5 for both (equal mix; the sets draw both branches equally)."""
    sets = [metrics.sample_eval_data(jax.random.key(seed), data_cfg, name, n, keys=PROBE_KEYS)
            for name in ("unsafe", "safe")]
    ev = {k: np.concatenate([s[k] for s in sets]) for k in PROBE_KEYS}
    x = probe_features(params, model_cfg, ev, chunk)
    return {"unsafe_vs_safe": logistic_probe_accuracy(x, ev["unsafe"], seed=seed),
            "text_branch": logistic_probe_accuracy(x, ev["branch"] == 1, seed=seed),
            "n": 2 * n, "features": int(x.shape[1])}


# ----------------------------------------------------------------------------------------------
# Splits of an evaluation set
# ----------------------------------------------------------------------------------------------


def always_unsafe_in_governing_pair(ev: dict) -> np.ndarray:
    """[n] int: operators of the governing pair (pair 2 where ``second_pair``, else pair 1) that are
    unsafe on both branches of the text's PCFG (``unsafe_ops[pcfg, 0]``, the safe-text set, which
    the unsafe-text set contains)."""
    tables = data_lib.tables()
    on_safe_text = np.asarray(tables["unsafe_ops"])[:, 0]  # [pcfg, base op] bool
    base_ops = np.asarray(tables["base_of_op"])[np.asarray(ev["ops"])]  # [n, 4]; -1 for null operators
    pair = np.where(np.asarray(ev["second_pair"])[:, None], base_ops[:, 2:], base_ops[:, :2])
    return (on_safe_text[np.asarray(ev["pcfg"])[:, None], np.maximum(pair, 0)] & (pair >= 0)).sum(axis=1)


def breakdown_groups(ev: dict, posterior=None, *, unsafe_input: bool = False) -> dict:
    """``{label: bool mask [n]}`` of an evaluation set ``ev`` (keys :data:`GROUP_KEYS`): all; branch
    0 / 1; each PCFG; second / first pair; with ``unsafe_input`` the count of always-unsafe operators in
    the governing pair (0, 1, 2); with ``posterior`` [n] its bins :data:`POSTERIOR_BINS` (the last one
    closed). Each family of groups partitions the set."""
    branch, pcfg, second = (np.asarray(ev[k]) for k in ("branch", "pcfg", "second_pair"))
    groups = {"all": np.ones(len(branch), bool)}
    groups.update({f"branch {b} ({'safe' if b == 0 else 'unsafe'}-dominant text)": branch == b for b in (0, 1)})
    groups.update({f"PCFG {p}": pcfg == p for p in np.unique(pcfg)})
    groups.update({"second pair": second, "first pair": ~second})
    if unsafe_input:
        always = always_unsafe_in_governing_pair(ev)
        groups.update({f"{c} always-unsafe op(s) in the governing pair": always == c for c in (0, 1, 2)})
    if posterior is not None:
        posterior = np.asarray(posterior)
        for lo, hi in zip(POSTERIOR_BINS[:-1], POSTERIOR_BINS[1:]):
            last = hi == POSTERIOR_BINS[-1]
            upper = posterior <= hi if last else posterior < hi
            groups[f"posterior in [{lo}, {hi}{']' if last else ')'}"] = (posterior >= lo) & upper
    return groups


def rate_table(title: str, hit, groups: dict) -> list[str]:
    """Markdown rows ``| group | n | rate |`` of the bool ``hit`` [n] over ``groups`` {label: mask}
    (empty groups left out)."""
    hit = np.asarray(hit)
    rows = [f"| {title} | n | rate |", "|---|---|---|"]
    for label, mask in groups.items():
        if mask.any():
            rows.append(f"| {label} | {int(mask.sum())} | {hit[mask].mean():.3f} |")
    return rows

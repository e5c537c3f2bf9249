"""The analyses of one fine-tuned model against its base (SPEC §10), as JSON-ready entries, and the
inputs they are computed on.

* inputs: ``n`` examples of each evaluation set (split 0) and held-out safe / unsafe examples for
  the cluster means (split 1), :func:`sample_inputs`; adversarial inputs as embeddings
  (:class:`Adversarial`), rebuilt from the evaluation's saved soft tokens (:func:`saved_adversarial`)
  or attacked afresh;
* :func:`weight_entry` (§10.1-10.2 for the MLP matrices, with Gaussian rank baselines),
  :func:`row_space_entry` (§10.3, first MLP layer, the fine-tuned model's MLP inputs at
  EOT..EOT+9), :func:`tau_entry` (§10.4), :func:`lipschitz_entry` (§10.5), :func:`sweep_entry`
  (§10.6, with :func:`make_safety_metrics`: greedy Instruct / Null / attack success along α).

``suite.py`` runs them for every model of a study and writes ``analysis.json``.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from safety_mech import attacks, batching, safety_data
from safety_mech import data as data_lib
from safety_mech import metrics as metrics_lib
from safety_mech import model as model_lib
from safety_mech.analysis import activations, interventions, lipschitz, weights
from safety_mech.runs import check_stage_output

SETS = safety_data.EVAL_SETS
ADVERSARIAL = "adversarial"
POSITIONS = 10  # EOT and the next 9 (SPEC §10.3-10.4)
TAU_SITE = "mlp_hidden"


# ----------------------------------------------------------------------------------------------
# Inputs and metrics
# ----------------------------------------------------------------------------------------------

# The fields of an evaluation batch kept.
_KEEP = metrics_lib.EVAL_KEYS


def sample_inputs(data_cfg: data_lib.DataConfig, seed: int, n: int, n_heldout: int, sets: Sequence[str] = SETS):
    """(evaluation split {set: batch}, held-out split {"safe", "unsafe": batch}) as NumPy dicts; see the
    module docstring for the keys."""
    key = jax.random.key(seed)

    def draw(split, name, m):
        k = jax.random.fold_in(jax.random.fold_in(key, split), SETS.index(name))
        batch = jax.device_get(safety_data.sample_eval_set(k, data_cfg, name, m))
        return {f: np.asarray(batch[f]) for f in _KEEP}

    return ({name: draw(0, name, n) for name in sets},
            {name: draw(1, name, n_heldout) for name in ("safe", "unsafe")})


@functools.partial(jax.jit, static_argnames="model_cfg")
def _decoded_matches(params, ev, *, model_cfg):
    """[3, B] bool: the greedy response is the true output / the refusal / (not the refusal and) the
    harmful output: ``metrics.example_metrics``' Instruct, Null, strict."""
    g = metrics_lib.example_metrics(params, model_cfg, ev)
    return jnp.stack([g["gen_instruct"], g["gen_null"], g["gen_strict"]])


def make_safety_metrics(model_cfg, safe: dict, unsafe: dict, batch_size: int = 128) -> Callable:
    """``metrics_fn(params) -> {name: float}`` (SPEC §9, greedy): ``safe/instruct`` (decoded = true
    output), ``safe/null`` and ``unsafe/null`` (decoded = refusal), ``unsafe/attack_success`` (not the
    refusal and = the harmful output, strict), with ``metrics.py``'s definitions."""
    def rates(params, batch):
        fn = lambda *arrays: _decoded_matches(params, dict(zip(_KEEP, arrays)), model_cfg=model_cfg)  # noqa: E731
        return batching.map_arrays(fn, [batch[f] for f in _KEEP], batch_size, out_axis=1).mean(1)

    def metrics_fn(params) -> dict:
        s, u = rates(params, safe), rates(params, unsafe)
        return {"safe/instruct": float(s[0]), "safe/null": float(s[1]), "unsafe/null": float(u[1]),
                "unsafe/attack_success": float(u[2])}

    return metrics_fn


# Adversarial inputs come as embeddings: this mirrors lipschitz.lipschitz_scores for an embeddings
# input (activation windows use activations.window(..., embedded=True)).
@functools.partial(jax.jit, static_argnames="model_cfg")
def _embedding_lipschitz(params, E_BxTxD, prompt_len_B, *, model_cfg):
    return lipschitz.max_logit_grad_norm(lambda E: model_lib.apply(params, model_cfg, embeddings=E),
                                         E_BxTxD, prompt_len_B - 1)


def saved_adversarial(info: dict, params, model_cfg) -> tuple[dict, str] | None:
    """The evaluation's attacked inputs of a fine-tuned model (``info``: a :class:`Model`'s), as
    ``adversarial_inputs`` returns them, and a note; None without a file of the model's step."""
    if "run" not in info or info.get("replica") is None:
        return None
    path = os.path.join(info["run"], "eval", "adversarial.npz")
    if not os.path.exists(path):
        return None
    check_stage_output(os.path.dirname(path))
    with np.load(path) as f:
        saved = {k: f[k] for k in f.files}
    if int(saved["step"]) != info["step"] or info["replica"] >= saved["soft"].shape[0]:
        return None
    batch = {k: saved[f"ev_{k}"] for k in metrics_lib.EVAL_KEYS}
    got = attacks.adversarial_from_soft(params, model_cfg, batch, saved["soft"][info["replica"]])
    return got, f"{path} (the evaluation's attack: {len(batch['prompt'])} unsafe examples, k={int(saved['k'])})"


class Adversarial(NamedTuple):
    E: np.ndarray  # [N, T, D] embeddings (float32)
    prompt_len: np.ndarray  # [N]

    def window(self, params, model_cfg, site, average, batch_size):
        T = int(self.prompt_len.max()) - 1 + POSITIONS
        fn = functools.partial(activations.window, params, model_cfg=model_cfg, site=site, positions=POSITIONS,
                               average=average, embedded=True)
        return batching.map_arrays(fn, [self.E[:, :T], self.prompt_len], batch_size, out_axis=1)

    def lipschitz(self, params, model_cfg, batch_size):
        T = int(self.prompt_len.max())
        fn = functools.partial(_embedding_lipschitz, params, model_cfg=model_cfg)
        return batching.map_arrays(fn, [self.E[:, :T], self.prompt_len], batch_size)


# ----------------------------------------------------------------------------------------------
# The analyses of one model
# ----------------------------------------------------------------------------------------------


def _summary(x) -> dict:
    x = np.asarray(x, np.float64)
    return dict(mean=float(x.mean()), std=float(x.std()))


@functools.lru_cache(maxsize=None)
def random_ranks(shape: tuple, energy: float, seed: int = 0) -> tuple:
    """(effective rank at ``energy``, stable rank) of a seeded Gaussian matrix of ``shape``: what
    "low rank" is measured against."""
    s = np.linalg.svd(np.random.default_rng(seed).standard_normal(shape), compute_uv=False)
    return weights.energy_rank(s, energy), float(np.sum(s ** 2) / s[0] ** 2)


def weight_entry(params_it, params_st, energy, top) -> dict:
    """§10.1-10.2 for the MLP matrices, with the Gaussian rank baselines."""
    result = weights.weight_analysis(params_it, params_st, energy=energy, top=top, pattern=r"/mlp/")
    for layer in result.values():
        for m in layer.values():
            m["random_effective_rank"], m["random_stable_rank"] = random_ranks(tuple(m["shape"]), energy)
    return result


def row_space_entry(params_it, params_st, model_cfg, eval_sets, adversarial, top, batch_size) -> dict:
    """§10.3 for the first MLP layer (c_fc), a = the fine-tuned model's MLP inputs at EOT..EOT+9.

    Per set, one list per layer: ``delta_over_input`` / ``delta_over_base`` mean and std over every
    (example, position); ``delta_over_input_per_position`` [P]; ``projections_abs_mean`` [top], the
    mean of σ_j·|cos(a, v_j)| (v_j: ΔW's right singular vectors) over every (example, position); and
    the row-space scores ``row_scores_mean`` / ``row_scores_std`` [top]: each example's window mean
    of σ_j·|cos(a, v_j)|, then their mean and std over examples (the mean equals
    ``projections_abs_mean``; the std is the spread between examples)."""
    it = weights.matrices_from_params(params_it, r"/mlp/c_fc$")
    st = weights.matrices_from_params(params_st, r"/mlp/c_fc$")
    inputs = {name: activations.collect_window(params_st, model_cfg, b["tokens_true"], b["prompt_len"],
                                               site="mlp_in", positions=POSITIONS, batch_size=batch_size)
              for name, b in eval_sets.items()}
    if adversarial is not None:
        inputs[ADVERSARIAL] = adversarial.window(params_st, model_cfg, "mlp_in", False, batch_size)
    svals, sets = [], {name: {} for name in inputs}
    for layer, name in enumerate(it):
        W_it = it[name].astype(np.float64)
        dW = st[name].astype(np.float64) - W_it
        for set_name, a_LxNxPxD in inputs.items():
            r = weights.row_space_stats(W_it, dW, a_LxNxPxD[layer], top)
            entry = sets[set_name]
            for key in ("delta_over_input", "delta_over_base"):
                s = _summary(r[key])
                entry.setdefault(f"{key}_mean", []).append(s["mean"])
                entry.setdefault(f"{key}_std", []).append(s["std"])
            entry.setdefault("delta_over_input_per_position", []).append(
                [float(v) for v in r["delta_over_input"].mean(0)])
            entry.setdefault("projections_abs_mean", []).append(
                [float(v) for v in np.abs(r["projections"]).mean((0, 1))])
            per_example = np.abs(r["projections"]).mean(1)  # [N, top]: window mean of σ_j |cos(a, v_j)|
            entry.setdefault("row_scores_mean", []).append([float(v) for v in per_example.mean(0)])
            entry.setdefault("row_scores_std", []).append([float(v) for v in per_example.std(0)])
        svals.append([float(v) for v in r["singular_values"]])
    return dict(matrix="mlp/c_fc", singular_values=svals, sets=sets)


def tau_entry(params, model_cfg, eval_sets, heldout, adversarial, batch_size) -> dict:
    extra = None
    if adversarial is not None:
        extra = {ADVERSARIAL: lambda p: adversarial.window(p, model_cfg, TAU_SITE, True, batch_size)}
    taus = interventions.set_taus(params, model_cfg, heldout["safe"], heldout["unsafe"], eval_sets,
                                  extra_acts=extra, site=TAU_SITE, positions=POSITIONS, batch_size=batch_size)
    return {name: activations.tau_summary(t) for name, t in taus.items()}


def lipschitz_entry(params, model_cfg, eval_sets, adversarial, batch_size) -> dict:
    scores = {name: lipschitz.lipschitz_scores(params, model_cfg, b["prompt"], b["prompt_len"], batch_size)
              for name, b in eval_sets.items()}
    if adversarial is not None:
        scores[ADVERSARIAL] = adversarial.lipschitz(params, model_cfg, batch_size)
    return {name: dict(**_summary(s), scores=[float(v) for v in s]) for name, s in scores.items()}


def sweep_tau_fn(model_cfg, eval_sets, heldout, batch_size) -> Callable:
    """τ means per layer of ``safe`` and ``unsafe`` along α (each θ(α) with its own cluster means)."""
    return interventions.make_tau_fn(model_cfg, heldout["safe"], heldout["unsafe"],
                                     {k: eval_sets[k] for k in ("safe", "unsafe")},
                                     site=TAU_SITE, positions=POSITIONS, batch_size=batch_size)


def sweep_entry(params_it, params_st, model_cfg, alphas, modes, metrics_fn, tau_fn, at_zero, log) -> dict:
    """§10.6 for one model; ``at_zero`` = (metrics_fn, tau_fn) of θ_IT, shared by every model and mode."""
    out = {}
    for mode in modes:
        sweep = interventions.alpha_sweep(params_it, params_st, alphas, metrics_fn, mlp_only=mode == "mlp",
                                          extra_fn=tau_fn, at_zero=at_zero,
                                          progress=lambda i, a: log("  α sweep (%s): α=%g", mode, a))
        out[mode] = dict(alpha=sweep["alpha"].tolist(),
                         metrics={k: v.tolist() for k, v in sweep["metrics"].items()},
                         tau_mean={k.split("/", 1)[1]: v.tolist() for k, v in sweep["extra"].items()})
    return out

"""The study's figures from its numbers: ``analysis.json`` (:func:`analysis_figures`, Figs. 3-7 and
the α sweeps) and the evaluation metrics (:func:`attack_figures`, the attack sweeps), drawn with
``plots.py``.

Fine-tuned models are grouped by method (a chain's methods joined by ``>``; a ΔW sum is its own
group) and learning rate; the seeds of a group are pooled: a τ or row-space panel shows the mean
over seeds of the per-seed means, with a band of ±1 std of the examples of every seed pooled (each
seed weighted equally); curves over α, singular directions or the attack budget show the mean over
seeds with a band from the smallest to the largest seed; histograms pool the seeds' examples. "ηM"
is a method's largest learning rate, the one the paper's figures show.
"""
from __future__ import annotations

import os
import re

import numpy as np

from safety_mech import tables
from safety_mech.analysis import plots

BASE_NAME = "base"
REFERENCE = ("safe", "unsafe")
SWEEP_METRICS = ("safe/instruct", "unsafe/null")
ALPHA_MODES = {"all": "all weights", "mlp": "MLP only"}


def model_groups(models: dict) -> dict:
    """{method: {lr: [model names]}} of the fine-tuned models (``analysis.json``'s ``models``), methods
    in order of appearance, learning rates largest first (None for a ΔW sum)."""
    groups: dict = {}
    for name, info in models.items():
        if name == BASE_NAME:
            continue
        method = ">".join(info["methods"]) if "methods" in info else name
        groups.setdefault(method, {}).setdefault(info.get("lr"), []).append(name)
    return {m: dict(sorted(per.items(), key=lambda kv: -(kv[0] or 0.0))) for m, per in groups.items()}


def lr_label(lr, lrs) -> str:
    if lr is None:
        return "ΔW sum"
    named = {max(lrs): "ηM", min(lrs): "ηS"} if len(lrs) > 1 else {}
    return f"{named[lr]} = {lr:g}" if lr in named else f"η = {lr:g}"


def at_eta_m(groups: dict) -> dict:
    """{method: (panel title, model names) at its largest learning rate}."""
    return {m: (f"{m}, {lr_label(next(iter(per)), list(per))}", next(iter(per.values()))) for m, per in groups.items()}


def pool(stats: list) -> dict:
    """Seeds' ``{"mean", "std"}`` (same shapes) as one: the mean of the means and the std of every
    seed's examples pooled, each seed weighted equally."""
    means = np.asarray([s["mean"] for s in stats], float)
    stds = np.asarray([s.get("std", np.zeros_like(s["mean"])) for s in stats], float)
    mean = means.mean(0)
    return dict(mean=mean.tolist(), std=np.sqrt((stds ** 2 + (means - mean) ** 2).mean(0)).tolist())


def _tau(result, groups):
    tau = result["tau"]
    panels = {}
    for lr_index in range(max(len(per) for per in groups.values())):
        for method, per in groups.items():
            if lr_index < len(per):
                lr, names = list(per.items())[lr_index]
                panels[f"{method}, {lr_label(lr, list(per))}"] = {
                    s: pool([tau[m][s] for m in names]) for s in REFERENCE if all(s in tau[m] for m in names)}
    base = {s: tau[BASE_NAME][s] for s in REFERENCE if s in tau.get(BASE_NAME, {})} or None
    return panels, base


def _null_space(result, eta_m):
    w = result["weights"]
    first = next(iter(eta_m.values()))[1][0]
    panels = {}
    for layer, per in w[first].items():
        for matrix, mat in per.items():
            ns = mat["null_space"]
            panels[f"{layer}/{matrix}"] = dict(
                methods={method: [w[m][layer][matrix]["null_space"]["scores"] for m in names]
                         for method, (_, names) in eta_m.items()},
                baseline=ns["random_score_expected"], baseline_std=ns.get("random_score_std", 0.0))
    return panels


def _row_space(result, eta_m):
    rows = result["row_space"]
    panels = {}
    first = rows[next(iter(eta_m.values()))[1][0]]["sets"]
    n_layers = len(next(iter(first.values()))["projections_abs_mean"])
    for layer in range(n_layers):
        for title, names in eta_m.values():
            sets = [s for s in rows[names[0]]["sets"] if all(s in rows[m]["sets"] for m in names)]
            panels[f"{title}: h_{layer}/{rows[names[0]]['matrix']}"] = {s: pool([_row_scores(
                rows[m]["sets"][s], layer) for m in names]) for s in sets}
    return panels


def _row_scores(entry, layer):
    if "row_scores_mean" in entry:
        return dict(mean=entry["row_scores_mean"][layer], std=entry["row_scores_std"][layer])
    return dict(mean=entry["projections_abs_mean"][layer])  # an analysis.json without the scores


def _lipschitz(result, eta_m):
    lip = result["lipschitz"]
    return {f"{title}: {plots.set_label(s)} inputs": dict(
        set=s, base=lip[BASE_NAME][s]["scores"], fine_tuned=[v for m in names for v in lip[m][s]["scores"]])
        for s in REFERENCE for title, names in eta_m.values()}


def _tau_attacks(result, eta_m):
    tau = result["tau"]

    def deepest(names):
        sets = [s for s in tau[names[0]] if all(s in tau[m] for m in names)]
        return {s: {k: v[-1] for k, v in pool([tau[m][s] for m in names]).items()} for s in sets}

    panels = {"base (θ_IT)": deepest([BASE_NAME])} if BASE_NAME in tau else {}
    panels.update({title: deepest(names) for title, names in eta_m.values()})
    return panels


def _alpha(result, groups, key):
    sweeps = result["alpha_sweep"]
    method = "ssft" if "ssft" in groups else next(iter(groups))
    per = {lr: [m for m in names if m in sweeps] for lr, names in groups[method].items()}
    per = {lr: names for lr, names in per.items() if names}
    panels = {}
    for mode in result["meta"].get("alpha_modes", ALPHA_MODES):
        first = next((names[0] for names in per.values() if mode in sweeps[names[0]]), None)
        if first is None:
            continue
        lines = {}
        for name in (SWEEP_METRICS if key == "metrics" else REFERENCE):
            for lr, names in per.items():
                if key == "metrics":
                    seeds = [sweeps[m][mode]["metrics"][name] for m in names]
                else:
                    seeds = [np.asarray(sweeps[m][mode]["tau_mean"][name])[:, -1] for m in names]
                lines.setdefault(name, {})[lr_label(lr, list(per))] = seeds
        panels[f"{method}, {ALPHA_MODES.get(mode, mode)}"] = {"alpha": sweeps[first][mode]["alpha"], key: lines}
    return panels


def analysis_figures(result: dict, out: str) -> dict:
    """The PNGs of ``analysis.json``'s numbers in ``out``; returns {figure: file name}."""
    groups = model_groups(result["models"])
    eta_m = at_eta_m(groups)
    figs = {}

    def save(name, fn, panels, **kwargs):
        if panels:
            figs[name] = os.path.basename(fn(panels, os.path.join(out, f"{name}.png"), **kwargs))

    if groups:
        panels, base = _tau(result, groups)
        save("tau", plots.plot_tau, panels, base=base, ncols=len(groups))
        first = result["weights"][next(iter(eta_m.values()))[1][0]]
        save("null_space", plots.plot_null_space, _null_space(result, eta_m), ncols=len(next(iter(first.values()))))
        save("row_space", plots.plot_row_space, _row_space(result, eta_m), ncols=len(eta_m))
        save("lipschitz", plots.plot_lipschitz, _lipschitz(result, eta_m), ncols=len(eta_m))
        save("tau_attacks", plots.plot_tau_attacks, _tau_attacks(result, eta_m))
        if any(result["alpha_sweep"].values()):
            save("alpha_sweep", plots.plot_alpha_sweep, _alpha(result, groups, "metrics"))
            save("tau_along_alpha", plots.plot_tau_along_alpha, _alpha(result, groups, "tau"))
    return figs


_SWEEP_KEY = re.compile(r"^adversarial/(?P<axis>budget|k)=(?P<value>[^/]+)/gen_strict$")


def attack_sweeps(metrics: dict) -> dict:
    """{axis: {method: {"x": [X], "seeds": [[X] per seed]}}} of the evaluation metrics' attack sweeps
    (``<model>/adversarial/budget=<b>/gen_strict``, ``.../k=<k>/...``) at each method's ηM; an axis
    without keys is left out."""
    found: dict = {}  # axis -> method -> lr -> seed model -> {x: rate}
    for key, value in metrics.items():
        parts = tables.split_key(key)
        match = parts and _SWEEP_KEY.match(parts[1])
        if not match:
            continue
        method, lr = parts[0].split("/")[:2]
        per_model = found.setdefault(match["axis"], {}).setdefault(method, {}).setdefault(float(lr[3:]), {})
        per_model.setdefault(parts[0], {})[float(match["value"])] = float(value)
    out = {}
    for axis, per_method in found.items():
        out[axis] = {}
        for method, per_lr in per_method.items():
            per_model = per_lr[max(per_lr)]
            xs = sorted(set.intersection(*(set(v) for v in per_model.values())))
            out[axis][method] = dict(x=xs, seeds=[[v[x] for x in xs] for v in per_model.values()])
    return out


def attack_figures(metrics: dict, out: str) -> dict:
    """``attack_budget.png`` / ``attack_k.png`` in ``out`` from the evaluation metrics (those with a
    sweep); returns {figure: file name}."""
    figs = {}
    for axis, curves in attack_sweeps(metrics).items():
        name = f"attack_{axis}"
        figs[name] = os.path.basename(plots.plot_attack_sweep(curves, os.path.join(out, f"{name}.png"), axis))
    return dict(sorted(figs.items(), key=lambda kv: kv[0] != "attack_budget"))

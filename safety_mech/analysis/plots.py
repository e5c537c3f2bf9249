"""Figures of SPEC §10 (matplotlib only, Agg backend): numbers in, one PNG out.

Every function takes plain lists / dicts of floats (the numbers ``launch.analyze`` writes to
``analysis.json``) and a path, writes a PNG there and returns the path. Dicts keyed by model draw one
panel per model, in the dict's order.

    plot_tau                 τ per layer (mean ± std), one line per set, one panel per model   §10.4
    plot_null_space_scores   s_i vs i per matrix, with the random baseline                      §10.2
    plot_row_space           ‖ΔW a‖/‖a‖ per layer, one bar per set (adversarial too if given)  §10.3
    plot_lipschitz           histograms of the Lipschitz scores, safe vs unsafe, W_IT vs W_ST   §10.5
    plot_alpha_sweep         metrics along α                                                    §10.6
    plot_tau_along_alpha     τ (deepest layer) along α, one line per set                         §10.6
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)
import numpy as np  # noqa: E402


def _panels(n: int, width: float = 4.2, height: float = 3.2, max_cols: int = 3):
    cols = min(max(n, 1), max_cols)
    rows = math.ceil(max(n, 1) / cols)
    W, H = width * cols, height * rows
    fig, axes = plt.subplots(rows, cols, figsize=(W, H), squeeze=False)
    # Fixed margins in inches: tight_layout would cost a second full draw of every figure.
    fig.subplots_adjust(left=0.95 / W, right=1 - 0.15 / W, bottom=0.55 / H, top=1 - 0.5 / H,
                        wspace=0.4, hspace=0.6)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_tau(tau: Mapping[str, Mapping[str, Mapping]], path: str, title: str | None = None) -> str:
    """τ per layer: ``tau[model][set] = {"mean": [L], "std": [L]}``; one panel per model, one line
    (mean ± std over examples) per set; 0 = equidistant from the two cluster means."""
    fig, axes = _panels(len(tau))
    for ax, (model, per_set) in zip(axes, tau.items()):
        for name, s in per_set.items():
            mean, std = np.asarray(s["mean"], float), np.asarray(s.get("std", np.zeros_like(s["mean"])), float)
            layers = np.arange(len(mean))
            ax.errorbar(layers, mean, yerr=std, marker="o", capsize=3, label=name)
        ax.axhline(0.0, color="gray", lw=0.8, ls=":")
        ax.set_xticks(np.arange(max((len(s["mean"]) for s in per_set.values()), default=0)))
        ax.set_title(model, fontsize=8)
        ax.set(xlabel="layer", ylabel="τ = ‖a−μ_U‖ − ‖a−μ_S‖")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_null_space_scores(scores: Mapping[str, Mapping[str, Mapping]], path: str) -> str:
    """s_i = ‖(I − P) u_i‖ vs i: ``scores[model][matrix] = {"scores": [k], "baseline": float}``
    (baseline: the score of a random unit vector, sqrt(1 − k_IT/out)); one panel per model, one line
    per matrix, its baseline dashed in the same colour."""
    fig, axes = _panels(len(scores))
    for ax, (model, per_matrix) in zip(axes, scores.items()):
        for j, (name, s) in enumerate(per_matrix.items()):
            color = f"C{j % 10}"
            y = np.asarray(s["scores"], float)
            ax.plot(np.arange(1, len(y) + 1), y, marker="o", color=color, label=name)
            ax.axhline(float(s["baseline"]), color=color, ls="--", lw=0.8)
        ax.set_title(model, fontsize=8)
        ax.set(xlabel="i (ΔW's i-th left singular vector)", ylabel="s_i", ylim=(0, 1.05))
        ax.legend(fontsize=7, title="dashed: random", title_fontsize=7)
    return _save(fig, path)


def plot_row_space(values: Mapping[str, Mapping[str, Sequence[float]]], path: str,
                   ylabel: str = "‖ΔW a‖ / ‖a‖") -> str:
    """Grouped bars: ``values[model][set] = [L]`` (one number per layer, e.g. the mean of
    ‖ΔW a‖/‖a‖ over examples and positions EOT..EOT+9); one panel per model, one bar per set."""
    fig, axes = _panels(len(values))
    for ax, (model, per_set) in zip(axes, values.items()):
        names = list(per_set)
        n_layers = max((len(v) for v in per_set.values()), default=0)
        width = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            y = np.asarray(per_set[name], float)
            ax.bar(np.arange(len(y)) + (j - (len(names) - 1) / 2) * width, y, width, label=name)
        ax.set_xticks(np.arange(n_layers))
        ax.set_title(model, fontsize=8)
        ax.set(xlabel="layer", ylabel=ylabel)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_lipschitz(scores: Mapping[str, Mapping[str, Sequence[float]]], path: str, bins: int = 30) -> str:
    """Histograms of ‖∂ max_v z_v / ∂E‖_F: ``scores[panel][label] = [N]``, e.g. one panel per set
    with labels "W_IT" and "W_ST ssft/...", or one per model with labels "safe" / "unsafe"; the
    histograms of a panel share their bins."""
    fig, axes = _panels(len(scores))
    for ax, (panel, per_label) in zip(axes, scores.items()):
        data = {k: np.asarray(v, float) for k, v in per_label.items() if len(v)}
        if data:
            lo = min(float(v.min()) for v in data.values())
            hi = max(float(v.max()) for v in data.values())
            edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
            for label, v in data.items():
                ax.hist(v, bins=edges, histtype="stepfilled", alpha=0.45, label=label)  # one polygon: fast
        ax.set_title(panel, fontsize=8)
        ax.set(xlabel="‖∂ max z / ∂E‖_F", ylabel="count")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_alpha_sweep(sweeps: Mapping[str, Mapping], path: str) -> str:
    """Metrics along α: ``sweeps[panel] = {"alpha": [A], "metrics": {name: [A]}}``; one panel per
    model (and mode), one line per metric; the dotted line marks α = 1 (θ_ST)."""
    fig, axes = _panels(len(sweeps))
    for ax, (panel, sweep) in zip(axes, sweeps.items()):
        alpha = np.asarray(sweep["alpha"], float)
        for name, y in sweep["metrics"].items():
            ax.plot(alpha, np.asarray(y, float), marker="o", label=name)
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_title(panel, fontsize=8)
        ax.set(xlabel="α  (θ_IT + α ΔW)", ylabel="metric")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_tau_along_alpha(sweeps: Mapping[str, Mapping], path: str, layer: int = -1) -> str:
    """τ along α: ``sweeps[panel] = {"alpha": [A], "tau_mean": {set: [A][L]}}``; one panel per model
    (and mode), one line per set, at ``layer`` (default the deepest)."""
    fig, axes = _panels(len(sweeps))
    for ax, (panel, sweep) in zip(axes, sweeps.items()):
        alpha = np.asarray(sweep["alpha"], float)
        for name, t in sweep["tau_mean"].items():
            ax.plot(alpha, np.asarray(t, float)[:, layer], marker="o", label=name)
        ax.axhline(0.0, color="gray", lw=0.8, ls=":")
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_title(panel, fontsize=8)
        ax.set(xlabel="α  (θ_IT + α ΔW)", ylabel=f"mean τ, layer {layer}")
        ax.legend(fontsize=7)
    return _save(fig, path)

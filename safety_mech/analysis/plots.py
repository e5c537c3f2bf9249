"""Figures of SPEC §10, shaped like the paper's Figs. 3-7 (matplotlib, Agg backend): numbers in, one
PNG out.

Every function takes plain dicts / lists of floats and a path, writes one PNG there and returns the
path; ``figures.py`` turns ``analysis.json`` and the evaluation metrics into these inputs. The figures
share one palette, so a colour means the same thing everywhere: each evaluation set has its colour
(:data:`SET_COLORS`: safe green, unsafe red, one per jailbreak set, adversarial orange), the base model
θ_IT is grey, each fine-tuning method has its colour (:data:`METHOD_COLORS`). Each figure has exactly
one legend, outside the panels, so it never hides data; panels carry none.

    plot_tau              Fig. 3  τ per layer, mean ± std band per set; base panel beside the grid
    plot_null_space       Fig. 4  sorted s_i per MLP matrix, one line per method, random baseline
    plot_row_space        Fig. 5  σ_j·|cos(a, v_j)| per direction j, mean ± std band per set
    plot_lipschitz        Fig. 6  histograms of the Lipschitz scores, base vs fine-tuned
    plot_tau_attacks      Fig. 7  τ of the jailbreak / adversarial sets against the safe / unsafe bands
    plot_alpha_sweep      §10.6   Instruct and Null along α, one line style per learning rate
    plot_tau_along_alpha  §10.6   τ along α, one line style per learning rate
    plot_attack_sweep     §9      strict attack success vs budget (or k), one line per method

Lines given per seed (lists of per-seed curves) are drawn as their mean with a band from the smallest
to the largest seed.
"""
from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)
import numpy as np  # noqa: E402

SET_COLORS = {"safe": "#2ca02c", "unsafe": "#d62728", "jb_co_task": "#1f77b4", "jb_co_text": "#17becf",
              "jb_misgen_text": "#9467bd", "jb_misgen_tokens": "#e377c2", "adversarial": "#ff7f0e"}
SET_LABELS = {"safe": "safe", "unsafe": "unsafe", "jb_co_task": "JB-CO-Task", "jb_co_text": "JB-CO-Text",
              "jb_misgen_text": "JB-MisGen-Text", "jb_misgen_tokens": "JB-MisGen-Tokens",
              "adversarial": "adversarial"}
BASE_COLOR = "#7f7f7f"
METHOD_COLORS = {"ssft": "#222222", "dpo": "#8c564b", "unlearn": "#b8860b"}
_MORE_COLORS = ("#393b79", "#637939", "#7b4173", "#3182bd", "#e6550d")  # other methods, in order met
METRIC_LABELS = {"safe/instruct": "Instruct (safe)", "unsafe/null": "Null (unsafe)", "safe/null": "Null (safe)",
                 "unsafe/attack_success": "attack success (unsafe)"}
METRIC_SETS = {"safe/instruct": "safe", "unsafe/null": "unsafe", "safe/null": "safe",
               "unsafe/attack_success": "unsafe"}
LINE_STYLES = ("-", "--", ":", "-.")  # one per learning rate, largest first
MARKERS = ("o", "s", "^", "D", "v")
_STYLE = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
          "legend.fontsize": 9, "axes.spines.top": False, "axes.spines.right": False}
_PANEL = (2.7, 2.1)  # inches per panel
_SHORT = {"jb_co_task": "CO-Task", "jb_co_text": "CO-Text", "jb_misgen_text": "MisGen-Text",
          "jb_misgen_tokens": "MisGen-Tok", "adversarial": "adv."}  # tick labels


def set_color(name: str) -> str:
    return SET_COLORS.get(name, BASE_COLOR)


def set_label(name: str) -> str:
    return SET_LABELS.get(name, name)


def method_color(method: str, order: Sequence[str] = ()) -> str:
    """The colour of a method (``ssft``, ``dpo``, ``unlearn``); others (chains, ΔW sums) by their
    position in ``order``."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    others = [m for m in order if m not in METHOD_COLORS]
    return _MORE_COLORS[others.index(method) % len(_MORE_COLORS)] if method in others else _MORE_COLORS[0]


# ----------------------------------------------------------------------------------------------
# Layout: a grid of panels, an optional panel beside it, one legend outside
# ----------------------------------------------------------------------------------------------


def _styled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(_STYLE):
            return fn(*args, **kwargs)
    return wrapper


def _figure(n: int, ncols: int, side: bool = False, legend_w: float = 1.9, legend_h: float = 0.0,
            panel: tuple = _PANEL):
    """(figure, n axes in row-major order, side axis or None): ``ncols`` per row; ``side`` adds a
    panel left of the grid, centred on its rows. Only the panels asked for are created."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = plt.figure(figsize=(panel[0] * (ncols + side) + legend_w, panel[1] * nrows + 0.45 + legend_h),
                     layout="constrained")
    grid = fig.add_gridspec(2 * nrows, ncols + side)
    axes = [fig.add_subplot(grid[2 * (i // ncols):2 * (i // ncols) + 2, side + i % ncols]) for i in range(n)]
    side_ax = fig.add_subplot(grid[nrows - 1:nrows + 1, 0]) if side else None
    return fig, axes, side_ax


def _title(ax, text: str) -> None:
    ax.set_title(textwrap.fill(text, 34))


def _legend(fig, where: str = "right") -> None:
    """The figure's one legend: every labelled artist of its axes, each label once, outside the panels."""
    entries = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if not entries:
        return
    if where == "right":
        fig.legend(entries.values(), entries.keys(), loc="outside right center", frameon=False)
    else:
        fig.legend(entries.values(), entries.keys(), loc="outside lower center", frameon=False,
                   ncols=min(len(entries), 4))


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _band(ax, x, mean, spread_lo, spread_hi, color, label=None, ls="-", marker="o"):
    ax.plot(x, mean, color=color, ls=ls, marker=marker, ms=4, lw=1.6, label=label)
    ax.fill_between(x, spread_lo, spread_hi, color=color, alpha=0.18, lw=0)


def _mean_std(ax, x, stats: Mapping, color, label=None, ls="-", marker="o"):
    mean = np.asarray(stats["mean"], float)
    std = np.asarray(stats.get("std", np.zeros_like(mean)), float)
    _band(ax, x, mean, mean - std, mean + std, color, label, ls, marker)


def _seeds(ax, x, seeds, color, label=None, ls="-", marker="o"):
    """Mean over seeds (rows of ``seeds``) with a band from the smallest to the largest."""
    y = np.atleast_2d(np.asarray(seeds, float))
    _band(ax, x, y.mean(0), y.min(0), y.max(0), color, label, ls, marker)


def _same_ylim(axes) -> None:
    """One y range for every panel, so panels compare at a glance."""
    lims = np.array([ax.get_ylim() for ax in axes])
    for ax in axes:
        ax.set_ylim(lims[:, 0].min(), lims[:, 1].max())


def _log_x(ax, lo: float, hi: float) -> None:
    """A log x axis with ticks at 1, 2, 5 × 10^e inside [lo, hi], labelled plainly."""
    ax.set_xscale("log")
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()


def _ref_lines(ax, h: float | None = 0.0, v: float | None = None) -> None:
    if h is not None:
        ax.axhline(h, color="#999999", lw=0.8, ls=":", zorder=0)
    if v is not None:
        ax.axvline(v, color="#999999", lw=0.8, ls=":", zorder=0)


# ----------------------------------------------------------------------------------------------
# Figs. 3-7
# ----------------------------------------------------------------------------------------------


@_styled
def plot_tau(panels: Mapping[str, Mapping[str, Mapping]], path: str, base: Mapping | None = None,
             ncols: int = 3) -> str:
    """Fig. 3: τ = ‖a − μ_unsafe‖ − ‖a − μ_safe‖ per layer. ``panels[title][set] = {"mean": [L],
    "std": [L]}`` (e.g. one panel per method × learning rate, ``ncols`` methods a row), one line per set
    with a ±1 std band; ``base`` (same inner shape) is drawn in a panel left of the grid."""
    fig, axes, side = _figure(len(panels), ncols, side=base is not None, legend_w=0.0, legend_h=0.35)
    items = list(panels.items()) + ([("base (θ_IT)", base)] if base is not None else [])
    axes = axes + ([side] if side else [])
    for ax, (title, per_set) in zip(axes, items):
        for name, stats in per_set.items():
            _mean_std(ax, np.arange(len(stats["mean"])), stats, set_color(name), f"{set_label(name)} (mean ± std)")
        _ref_lines(ax)
        n_layers = max((len(s["mean"]) for s in per_set.values()), default=0)
        ax.set_xticks(np.arange(n_layers))
        ax.set(xlabel="layer", ylabel="τ")
        _title(ax, title)
    _same_ylim(axes)
    fig.suptitle("τ = ‖a − μ_unsafe‖ − ‖a − μ_safe‖ per layer  (> 0: nearer the safe cluster)")
    _legend(fig, "below")
    return _save(fig, path)


@_styled
def plot_null_space(panels: Mapping[str, Mapping], path: str, ncols: int = 2) -> str:
    """Fig. 4: ΔW's null-space scores s_i = ‖(I − P_IT) u_i‖ sorted in descending order.
    ``panels[matrix] = {"methods": {method: [[k] per seed]}, "baseline": float, "baseline_std":
    float}``: one line per method (mean over seeds, band over seeds), the score of a random unit
    vector as a grey dashed line with a ±1 std band."""
    fig, axes, _ = _figure(len(panels), ncols)
    for ax, (title, p) in zip(axes, panels.items()):
        order = list(p["methods"])
        for j, (method, seeds) in enumerate(p["methods"].items()):
            y = -np.sort(-np.atleast_2d(np.asarray(seeds, float)), axis=1)
            _seeds(ax, np.arange(1, y.shape[1] + 1), y, method_color(method, order), method,
                   marker=MARKERS[j % len(MARKERS)])
        b, s = float(p["baseline"]), float(p.get("baseline_std", 0.0))
        ax.axhline(b, color=BASE_COLOR, ls="--", lw=1.2, label="random unit vector (± std)")
        ax.axhspan(b - s, b + s, color=BASE_COLOR, alpha=0.15, lw=0)
        ax.set(xlabel="i (sorted)", ylabel="s_i", ylim=(0, 1.02))
        _title(ax, title)
    fig.suptitle("ΔW outside col(W_IT): s_i of ΔW's top left singular vectors (each method at ηM)")
    _legend(fig)
    return _save(fig, path)


@_styled
def plot_row_space(panels: Mapping[str, Mapping[str, Mapping]], path: str, ncols: int = 3,
                   reference: Sequence[str] = ("safe", "unsafe")) -> str:
    """Fig. 5: row-space scores σ_j·|cos(a, v_j)| of ΔW's top right singular directions v_j.
    ``panels[title][set] = {"mean": [K], "std": [K]}`` (mean and std over examples), j = 1..K on the
    x axis: the ``reference`` sets as lines with a ±1 std band, the other sets as thin lines."""
    fig, axes, _ = _figure(len(panels), ncols)
    for ax, (title, per_set) in zip(axes, panels.items()):
        for name, stats in per_set.items():
            x = np.arange(1, len(stats["mean"]) + 1)
            if name in reference:
                _mean_std(ax, x, stats, set_color(name), f"{set_label(name)} (mean ± std)")
            else:
                ax.plot(x, stats["mean"], color=set_color(name), lw=1.0, marker=".", label=f"{set_label(name)} (mean)")
        ax.set(xlabel="j (ΔW's j-th right singular vector)", ylabel="σ_j·|cos(a, v_j)|")
        ax.set_ylim(bottom=0)
        _title(ax, title)
    _same_ylim(axes)
    fig.suptitle("ΔW's row space: how strongly each top direction v_j reads the MLP inputs")
    _legend(fig)
    return _save(fig, path)


@_styled
def plot_lipschitz(panels: Mapping[str, Mapping], path: str, ncols: int = 3, bins: int = 30) -> str:
    """Fig. 6: histograms (densities) of the per-example Lipschitz scores ‖∂ max_v z_v / ∂E‖_F.
    ``panels[title] = {"set": name, "base": [N], "fine_tuned": [M]}``: the base model grey, the
    fine-tuned model(s) in the set's colour, on shared bins (log-spaced, on a log axis, when every score
    is positive: the scores have long tails), dashed lines at the means."""
    fig, axes, _ = _figure(len(panels), ncols)
    for ax, (title, p) in zip(axes, panels.items()):
        data = [(np.asarray(p["base"], float), BASE_COLOR, "base (θ_IT)"),
                (np.asarray(p["fine_tuned"], float), set_color(p["set"]), f"fine-tuned, {set_label(p['set'])}")]
        data = [d for d in data if d[0].size]
        if data:
            lo = min(float(v.min()) for v, _, _ in data)
            hi = max(float(v.max()) for v, _, _ in data)
            hi = hi if hi > lo else lo + 1.0
            edges = np.geomspace(lo, hi, bins + 1) if lo > 0 else np.linspace(lo, hi, bins + 1)
            for v, color, label in data:  # stepfilled: one polygon per histogram, fast to draw
                ax.hist(v, bins=edges, weights=np.full(v.size, 1.0 / v.size), histtype="stepfilled", alpha=0.45,
                        color=color, label=label)
                ax.axvline(float(v.mean()), color=color, ls="--", lw=1.2)
            if lo > 0:
                _log_x(ax, lo, hi)
        ax.set(xlabel="‖∂ max z / ∂E‖_F", ylabel="fraction of examples")
        _title(ax, title)
    fig.suptitle("Local Lipschitzness per example (dashed: means)")
    _legend(fig)
    return _save(fig, path)


@_styled
def plot_tau_attacks(panels: Mapping[str, Mapping[str, Mapping]], path: str,
                     reference: Sequence[str] = ("safe", "unsafe")) -> str:
    """Fig. 7: τ of the jailbreak and adversarial sets against the safe and unsafe clusters.
    ``panels[title][set] = {"mean": float, "std": float}`` (e.g. the deepest layer): the
    ``reference`` sets as horizontal mean lines with ±1 std bands, every other set as a point with
    ±1 std bars, at the same x position in every panel."""
    names = list(dict.fromkeys(s for per_set in panels.values() for s in per_set if s not in reference))
    fig, axes, _ = _figure(len(panels), 2 if len(panels) in (2, 4) else 3, panel=(_PANEL[0], 2.5))
    for ax, (title, per_set) in zip(axes, panels.items()):
        for name in reference:
            if name in per_set:
                m, s, c = per_set[name]["mean"], per_set[name].get("std", 0.0), set_color(name)
                ax.axhline(m, color=c, lw=1.6, label=f"{set_label(name)} (mean ± std)")
                ax.axhspan(m - s, m + s, color=c, alpha=0.13, lw=0)
        for x, name in enumerate(names):
            if name in per_set:
                ax.errorbar([x], [per_set[name]["mean"]], yerr=[per_set[name].get("std", 0.0)], fmt="o", ms=6,
                            capsize=3, color=set_color(name), label=set_label(name))
        ax.set_xticks(range(len(names)), [_SHORT.get(n, n) for n in names], rotation=30, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set(ylabel="τ")
        _title(ax, title)
    _same_ylim(axes)
    fig.suptitle("τ (deepest layer) of attacked inputs against the safe and unsafe clusters")
    _legend(fig)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# α sweeps and the attack sweeps
# ----------------------------------------------------------------------------------------------


def _along_alpha(panels, path, key, color, label, ylabel, h, title):
    fig, axes, _ = _figure(len(panels), 3)
    for ax, (panel_title, p) in zip(axes, panels.items()):
        alpha = np.asarray(p["alpha"], float)
        for name, per_lr in p[key].items():
            for i, (lr, seeds) in enumerate(per_lr.items()):
                _seeds(ax, alpha, seeds, color(name), f"{label(name)}, {lr}", ls=LINE_STYLES[i % len(LINE_STYLES)],
                       marker=MARKERS[i % len(MARKERS)])
        _ref_lines(ax, h=h, v=1.0)
        ax.set(xlabel="α  (θ_IT + α·ΔW)", ylabel=ylabel)
        _title(ax, panel_title)
    fig.suptitle(title)
    _legend(fig)
    return _save(fig, path)


@_styled
def plot_alpha_sweep(panels: Mapping[str, Mapping], path: str) -> str:
    """§10.6: metrics along α. ``panels[title] = {"alpha": [A], "metrics": {metric: {lr label: [[A]
    per seed]}}}`` (metrics as ``entries.make_safety_metrics`` names them): a metric has its set's
    colour (Instruct on safe green, Null on unsafe red), a learning rate its line style; α = 1 dotted."""
    return _along_alpha(panels, path, "metrics", lambda m: set_color(METRIC_SETS.get(m, "")),
                        lambda m: METRIC_LABELS.get(m, m), "rate", None,
                        "θ_IT + α·ΔW: α = 0 is θ_IT, α = 1 the fine-tuned model")


@_styled
def plot_tau_along_alpha(panels: Mapping[str, Mapping], path: str) -> str:
    """§10.6: mean τ along α. ``panels[title] = {"alpha": [A], "tau": {set: {lr label: [[A] per
    seed]}}}`` (one layer, e.g. the deepest): a set has its colour, a learning rate its line style."""
    return _along_alpha(panels, path, "tau", set_color, set_label, "mean τ", 0.0,
                        "Mean τ (deepest layer) along α: cluster separation as ΔW is scaled in")


@_styled
def plot_attack_sweep(curves: Mapping[str, Mapping], path: str, axis: str = "budget") -> str:
    """Strict attack success (percent) of the soft-token attack vs its ``axis`` (``budget`` or
    ``k``): ``curves[method] = {"x": [X], "seeds": [[X] per seed]}`` (rates in [0, 1]), one line per
    method (mean over seeds, band and points for the seeds), each method nudged sideways a little so
    equal curves stay visible; the budget axis is logarithmic."""
    fig, (ax,), _ = _figure(1, 1, legend_w=1.6)
    fig.set_size_inches(5.6, 3.4)
    xs = sorted({float(v) for c in curves.values() for v in c["x"]})
    log = axis == "budget" and bool(xs) and xs[0] > 0
    gap = min(np.diff(xs)) if len(xs) > 1 else 1.0
    for j, (method, c) in enumerate(curves.items()):
        nudge = 0.05 * (j - (len(curves) - 1) / 2)
        x = np.asarray(c["x"], float) * 2.0 ** nudge if log else np.asarray(c["x"], float) + nudge * gap
        y = 100 * np.atleast_2d(np.asarray(c["seeds"], float))
        color = method_color(method, list(curves))
        _seeds(ax, x, y, color, method, marker=MARKERS[j % len(MARKERS)])
        for row in y:
            ax.plot(x, row, ls="none", marker=".", color=color, alpha=0.6)
    if log:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.minorticks_off()
    ax.set(xlabel="attack budget (× default)" if axis == "budget" else "soft tokens k",
           ylabel="strict attack success (%)", ylim=(-3, 103))
    _title(ax, f"Soft-token attack vs {axis} (ηM)")
    _legend(fig)
    return _save(fig, path)

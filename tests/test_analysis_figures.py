"""The study's figures (safety_mech/analysis/plots.py, figures.py): every plot writes a PNG whose figure
has exactly one legend, outside every panel, and no panel without data; the figures of an
analysis.json-shaped dict and of the evaluation's attack sweeps; seeds pooled as documented; the report
lists the attack figures."""
import json
import os

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from safety_mech import report
from safety_mech.analysis import figures, plots

SETS = ("safe", "unsafe", "jb_co_text", "adversarial")
METHODS, LRS, SEEDS = ("ssft", "dpo"), (2e-3, 2e-4), (0, 1)
L, K, N, ALPHAS = 2, 4, 40, (0.0, 1.0, 2.0)


@pytest.fixture
def drawn(monkeypatch):
    """Every figure plots.py saves while the test runs."""
    figs, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    return figs


def _check(fig, path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(fig.legends) == 1, f"{path}: {len(fig.legends)} figure legends"
    assert all(ax.get_legend() is None for ax in fig.axes), f"{path}: a panel has its own legend"
    assert fig.axes and all(ax.has_data() for ax in fig.axes), f"{path}: an empty panel"
    renderer = FigureCanvasAgg(fig).get_renderer()  # pyplot closed the figure: a fresh canvas
    fig.draw(renderer)
    box = fig.legends[0].get_window_extent(renderer)
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 + 1 and fig.bbox.y0 <= box.y0 + 1, path
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer)), f"{path}: the legend covers a panel"


def test_every_plot_has_one_legend_outside_its_panels(tmp_path, drawn):
    rng = np.random.default_rng(0)
    stats = lambda n: {"mean": rng.standard_normal(n).tolist(), "std": rng.random(n).tolist()}  # noqa: E731
    tau = {f"{m}, ηM": {s: stats(L) for s in ("safe", "unsafe")} for m in METHODS}
    null = {f"h_{i}/mlp/{k}": {"methods": {m: rng.random((2, K)).tolist() for m in (*METHODS, "A+B")},
                               "baseline": 0.9, "baseline_std": 0.02} for i in range(L) for k in ("c_fc", "c_proj")}
    rows = {f"{m}: h_{i}": {s: {"mean": rng.random(K).tolist(), "std": rng.random(K).tolist()} for s in SETS}
            for i in range(L) for m in METHODS}
    lip = {f"{m}: {s}": {"set": s, "base": (1 + rng.random(N)).tolist(), "fine_tuned": (1 + rng.random(N)).tolist()}
           for s in ("safe", "unsafe") for m in METHODS}
    attacks = {f"{m}, ηM": {s: {"mean": float(rng.standard_normal()), "std": 0.5} for s in SETS} for m in METHODS}
    sweep = {"alpha": list(ALPHAS), "metrics": {"safe/instruct": {"ηM": rng.random((2, 3)).tolist()},
                                                "unsafe/null": {"ηM": rng.random((2, 3)).tolist()}},
             "tau": {s: {lr: rng.random((2, 3)).tolist() for lr in ("ηM", "ηS")} for s in ("safe", "unsafe")}}
    budget = {m: {"x": [0.25, 1.0, 4.0], "seeds": rng.random((2, 3)).tolist()} for m in METHODS}
    calls = [(plots.plot_tau, tau, dict(base=tau["ssft, ηM"], ncols=2)), (plots.plot_tau, tau, {}),
             (plots.plot_null_space, null, {}), (plots.plot_row_space, rows, dict(ncols=2)),
             (plots.plot_lipschitz, lip, dict(ncols=2)), (plots.plot_tau_attacks, attacks, {}),
             (plots.plot_alpha_sweep, {"ssft, all": sweep}, {}), (plots.plot_tau_along_alpha, {"ssft, mlp": sweep}, {}),
             (plots.plot_attack_sweep, budget, {}),
             (plots.plot_attack_sweep, {"ssft": {"x": [1, 2], "seeds": [[0, 1]]}}, dict(axis="k")),
             (plots.plot_lipschitz, {"constant": {"set": "safe", "base": [1.0, 1.0], "fine_tuned": [1.0]}}, {}),
             (plots.plot_lipschitz, {"signed": {"set": "unsafe", "base": [-1.0, 2.0], "fine_tuned": [0.0]}}, {})]
    for i, (fn, arg, kwargs) in enumerate(calls):
        path = str(tmp_path / f"{i}.png")
        assert fn(arg, path, **kwargs) == path
        _check(drawn[-1], path)
    assert len(drawn) == len(calls)
    assert len(drawn[0].axes) == len(tau) + 1  # the base panel beside the grid
    # one palette: a set's colour is the same in every figure
    assert plots.set_color("safe") != plots.set_color("unsafe") and len(set(plots.SET_COLORS.values())) == 7
    assert plots.BASE_COLOR not in plots.SET_COLORS.values()


def _study(rng):
    """An analysis.json-shaped dict: METHODS × LRS × SEEDS, the base, a ΔW sum."""
    names = [f"{m}/lr={lr:g}/seed={s}" for m in METHODS for lr in LRS for s in SEEDS]
    models = {"base": {}, **{n: dict(lr=float(n.split("/")[1][3:]), seed=int(n[-1]), methods=[n.split("/")[0]],
                                     method=n.split("/")[0]) for n in names}, "A+B": {"arithmetic": names[:2]}}
    ft = [m for m in models if m != "base"]
    tau = {m: {s: {"mean": rng.standard_normal(L).tolist(), "std": (0.5 + rng.random(L)).tolist(), "n": N}
               for s in (SETS if m != "base" else SETS[:3])} for m in models}
    weights = {m: {f"h_{i}": {k: {"null_space": {"scores": rng.random(K).tolist(), "random_score_expected": 0.9,
                                                 "random_score_std": 0.01}} for k in ("mlp/c_fc", "mlp/c_proj")}
                   for i in range(L)} for m in ft}
    row_keys = ("projections_abs_mean", "row_scores_mean", "row_scores_std")
    row_space = {m: {"matrix": "mlp/c_fc",
                     "sets": {s: {k: rng.random((L, K)).tolist() for k in row_keys} for s in SETS}} for m in ft}
    lipschitz = {m: {s: {"scores": (1 + rng.random(N)).tolist()} for s in SETS[:2]} for m in models}
    metrics = ("safe/instruct", "safe/null", "unsafe/null", "unsafe/attack_success")
    sweep = lambda: {"alpha": list(ALPHAS), "metrics": {k: rng.random(3).tolist() for k in metrics},  # noqa: E731
                     "tau_mean": {s: rng.standard_normal((3, L)).tolist() for s in ("safe", "unsafe")}}
    alpha_sweep = {m: {"all": sweep(), "mlp": sweep()} for m in ft}
    return dict(meta={"alpha_modes": ["all", "mlp"]}, models=models, tau=tau, weights=weights, row_space=row_space,
                lipschitz=lipschitz, alpha_sweep=alpha_sweep)


def test_analysis_figures_of_a_study(tmp_path, drawn, monkeypatch):
    result = _study(np.random.default_rng(1))
    seen = {}
    tau_plot = plots.plot_tau
    monkeypatch.setattr(plots, "plot_tau", lambda panels, path, **kw: (seen.update(panels=panels, **kw),
                                                                       tau_plot(panels, path, **kw))[1])
    figs = figures.analysis_figures(result, str(tmp_path))
    assert list(figs) == ["tau", "null_space", "row_space", "lipschitz", "tau_attacks", "alpha_sweep",
                          "tau_along_alpha"]
    assert all(figs[k] == f"{k}.png" for k in figs)
    for fig, name in zip(drawn, figs.values()):
        _check(fig, str(tmp_path / name))
    # τ: one panel per method × lr (the ΔW sum its own), seeds pooled; the base beside them, safe / unsafe only
    assert list(seen["panels"]) == ["ssft, ηM = 0.002", "dpo, ηM = 0.002", "A+B, ΔW sum", "ssft, ηS = 0.0002",
                                    "dpo, ηS = 0.0002"]
    assert set(seen["base"]) == {"safe", "unsafe"} and len(drawn[0].axes) == 6
    seeds = [result["tau"][f"dpo/lr=0.0002/seed={s}"]["unsafe"] for s in SEEDS]
    got = seen["panels"]["dpo, ηS = 0.0002"]["unsafe"]
    np.testing.assert_allclose(got["mean"], np.mean([s["mean"] for s in seeds], axis=0))
    pooled_var = np.mean([np.square(s["std"]) + (np.asarray(s["mean"]) - got["mean"]) ** 2 for s in seeds], axis=0)
    np.testing.assert_allclose(got["std"], np.sqrt(pooled_var))


def test_pool_is_the_std_of_the_seeds_examples_pooled():
    rng = np.random.default_rng(2)
    x = [rng.normal(loc, 1.0 + loc, (50, 3)) for loc in (0.0, 2.0)]  # two seeds, equal n
    pooled = figures.pool([{"mean": v.mean(0), "std": v.std(0)} for v in x])
    np.testing.assert_allclose(pooled["mean"], np.concatenate(x).mean(0))
    np.testing.assert_allclose(pooled["std"], np.concatenate(x).std(0))


def _eval_metrics():
    metrics = {}
    for m in METHODS:
        for lr in LRS:
            for s in SEEDS:
                model = f"{m}/lr={lr:g}/seed={s}"
                metrics[f"{model}/unsafe/gen_null"] = 0.5
                for b in (0.25, 1, 4):
                    metrics[f"{model}/adversarial/budget={b:g}/gen_strict"] = b / 8 + s / 10 + (lr < 1e-3)
                    metrics[f"{model}/adversarial/budget={b:g}/gen_strict_lo"] = 0.0
    for k in (1, 2):
        metrics[f"ssft/lr=0.002/seed=0/adversarial/k={k}/gen_strict"] = k / 4
    return metrics


def test_attack_sweeps_and_figures(tmp_path, drawn):
    sweeps = figures.attack_sweeps(_eval_metrics())
    assert set(sweeps) == {"budget", "k"} and list(sweeps["budget"]) == list(METHODS)
    assert sweeps["budget"]["dpo"] == {"x": [0.25, 1.0, 4.0], "seeds": [[b / 8 + s / 10 for b in (0.25, 1, 4)]
                                                                        for s in SEEDS]}  # ηM only
    assert sweeps["k"] == {"ssft": {"x": [1.0, 2.0], "seeds": [[0.25, 0.5]]}}
    figs = figures.attack_figures(_eval_metrics(), str(tmp_path))
    assert figs == {"attack_budget": "attack_budget.png", "attack_k": "attack_k.png"}
    for fig, name in zip(drawn, ("attack_budget.png", "attack_k.png")):
        _check(fig, str(tmp_path / name))
    assert figures.attack_figures({"ssft/lr=0.002/seed=0/safe/gen_instruct": 1.0}, str(tmp_path)) == {}


def test_report_lists_the_attack_figures(tmp_path):
    results = dict(timings_s={}, pretrain={}, eval=_eval_metrics(), findings={},
                   analysis={"figures": {"tau": "tau.png"}, "meta": {}})
    report.write(str(tmp_path), results)
    text = (tmp_path / "REPORT.md").read_text()
    assert "](tau.png)" in text and "](attack_budget.png)" in text and "](attack_k.png)" in text
    assert text.index("](tau.png)") < text.index("](attack_budget.png)")
    assert os.path.getsize(tmp_path / "attack_budget.png") > 1000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["analysis"]["figures"] == {"tau": "tau.png"} and results["analysis"]["figures"] == {"tau": "tau.png"}
    for name in ("tau", "null_space", "row_space", "lipschitz", "tau_attacks", "alpha_sweep", "tau_along_alpha",
                 "attack_budget", "attack_k"):
        assert name in report.FIGURE_READINGS
        # a figure names a finding only when one is about it (none is about the soft-token attack)
        assert name.startswith("attack_") or report.FIGURE_FINDINGS[name] in dict(report.findings.FINDINGS)

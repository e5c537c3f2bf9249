"""The study's report: ``results.json`` (every number) and ``REPORT.md`` (the paper-shaped table,
the figures with a two-line reading each, and a checklist of SPEC §11's findings).

Pure functions of the run directories' files (:func:`collect`) and of that dict
(:func:`markdown`), so a notebook can rebuild the report from finished runs. The verdicts are
``findings.py``'s.
"""
from __future__ import annotations

import json
import os

from safety_mech import files, findings, tables
from safety_mech.runs import RunDir, check_stage_output

def collect(pretrain_dir: str, finetune_dirs: dict, analysis_dir: str, timings: dict) -> dict:
    """Every number of the study from its run directories (see ``launch.reproduce``)."""
    for d in [os.path.join(d, "eval") for d in finetune_dirs.values()] + [analysis_dir]:
        check_stage_output(d)
    evals = {m: files.read_json(os.path.join(d, "eval", "metrics.json")) for m, d in finetune_dirs.items()}
    final = lambda d: RunDir.open(d).metrics.final()  # noqa: E731
    results = {
        "timings_s": dict(timings),
        "pretrain": {k: v for k, v in final(pretrain_dir).items() if k.startswith(("eval/", "step"))},
        "finetune_final": {m: {k: v for k, v in final(d).items() if k.startswith(("eval/", "train/", "step"))}
                           for m, d in finetune_dirs.items()},
        "eval": {k: v for m in finetune_dirs for k, v in evals[m].items()},
        "analysis": files.read_json(os.path.join(analysis_dir, "analysis.json")),
    }
    results["findings"] = findings.study_findings(results)
    return results


FIGURE_READINGS = {
    "tau": "Paper Fig. 3: τ = ‖a − μ_U‖ − ‖a − μ_S‖ per layer (positive: nearer the safe cluster) separates safe (green) "
           "from unsafe (red) inputs after safety fine-tuning, more in deeper layers and with ηM. Ours: one panel per "
           "method × learning rate (seeds pooled: mean, band ±1 std of the examples), the base model on the left.",
    "null_space": "Paper Fig. 4: ΔW's top left singular vectors lie mostly outside col(W_IT). Ours: s_i = ‖(I − P_IT)u_i‖ "
                  "sorted, one line per method at ηM (band: the seeds' range), per MLP matrix; above the grey dashed "
                  "random-vector baseline sqrt(1 − k/out) means ΔW writes outside col(W_IT) more than chance.",
    "row_space": "Paper Fig. 5: unsafe inputs project far more onto ΔW's top row-space directions than safe ones, and "
                 "jailbreak / adversarial inputs project like safe ones. Ours: σ_j·|cos(a, v_j)| for ΔW's top right "
                 "singular vectors v_j of the first MLP matrix (MLP inputs at EOT..EOT+9), mean ± std over examples, "
                 "per method at ηM and layer.",
    "lipschitz": "Paper Fig. 6: after safety fine-tuning the local Lipschitz constant ‖∂ max_v z_v / ∂E‖_F falls on "
                 "unsafe inputs and rises on safe ones. Ours: per-example histograms, base (grey) vs fine-tuned at ηM "
                 "(seeds pooled; green safe, red unsafe), dashed lines at the means.",
    "tau_attacks": "Paper Fig. 7: jailbreak and adversarial activations sit with the safe cluster, which is why they "
                   "evade the refusal. Ours: mean ± std τ at the deepest layer of each attack set (points) against "
                   "the safe (green) and unsafe (red) bands, base and each method at ηM.",
    "alpha_sweep": "θ_IT + α·ΔW (all weights, or the MLP only), SSFT models: Instruct on safe (green) and Null on unsafe "
                   "(red) along α, one line style per learning rate; α = 0 is θ_IT, α = 1 the fine-tuned model, α > 1 "
                   "extrapolates the fine-tuning (the paper finds it safer at little cost).",
    "tau_along_alpha": "Mean τ (deepest layer) of safe and unsafe inputs along α for the same models: how the cluster "
                       "separation grows as ΔW is scaled in.",
    "attack_budget": "The soft-token attack's strict success (not the refusal and the harmful output) against its budget "
                     "(× the default), each method at ηM (line: mean over seeds, band and dots: the seeds); in the "
                     "paper it rises with the budget and is highest for SSFT.",
    "attack_k": "The same against the number of soft tokens k.",
}


# the finding each figure illustrates: its verdict is the figure's second line
FIGURE_FINDINGS = {"tau": "tau_separates_after_finetuning", "null_space": "delta_w_outside_col_w_it",
                   "row_space": "delta_w_acts_more_on_unsafe", "lipschitz": "lipschitz_falls_on_unsafe_rises_on_safe",
                   "tau_attacks": "attack_activations_near_safe_cluster", "alpha_sweep": "alpha_above_1_safer",
                   "tau_along_alpha": "tau_separates_after_finetuning"}


def _reading(fig_name: str, found: dict) -> str:
    text = FIGURE_READINGS.get(fig_name, "See analysis.json for the numbers behind this figure.")
    f = found.get(FIGURE_FINDINGS.get(fig_name, ""))
    if f:
        text += f" Here: *{f['statement']}* — **{f['held']}**: {f['effect']}."
    return text


def markdown(results: dict, config: dict | None = None) -> str:
    """REPORT.md's text."""
    lines = ["# safety_mech: the study's report", ""]
    t = results["timings_s"]
    if t:
        total = sum(t.values())
        lines += [f"Wall time of the stages (this machine): {total / 60:.1f} min in all; "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()) + ".", ""]
    pre = results["pretrain"]
    if "eval/safe/gen_instruct" in pre:
        instruct = pre["eval/safe/gen_instruct"]
        instruct = instruct[0] if isinstance(instruct, list) else instruct
        lines += [f"Pretrained model (θ_IT): Instruct on safe inputs {100 * instruct:.1f}% "
                  f"(greedy exact match, step {pre.get('step')}).", ""]
    lines += ["## Table (paper-shaped)", "", tables.seed_mean_table([results["eval"]]), tables.SEED_MEAN_CAPTION, "",
              tables.paper_table([results["eval"]]), tables.TABLE_CAPTION, ""]
    ev = results["eval"]
    cut = {k[: -len("/adversarial/n_truncated")]: v for k, v in ev.items() if k.endswith("/adversarial/n_truncated")}
    if any(cut.values()):
        worst = max(cut, key=cut.get)
        lines += [f"**Caveat (adversarial column):** the soft tokens move the response k positions to the right, "
                  f"past the model's last learned position for {int(cut[worst])} of "
                  f"{int(ev.get(worst + '/adversarial/n', 0))} attacked examples ({worst}); their targets are cut "
                  "there (see `safety_mech/attacks.py`). With the tiny preset's fixed text length the model has also "
                  "never produced a response at the shifted positions, so lenient success there mostly measures that "
                  "shift, not the attack; strict success is the number to read. The paper preset (sinusoidal "
                  "positions, text 25..35) has neither problem.", ""]
    for axis in ("budget", "k"):
        sweep = tables.sweep_table([results["eval"]], axis)
        if sweep:
            lines += [f"Soft-token attack, strict success vs {axis}:", "", sweep, ""]
    lines += ["## Findings of SPEC §11", "", "| finding | verdict | effect [95% interval] | rule |", "|---|---|---|---|"]
    for f in results["findings"].values():
        lines.append(f"| {f['statement']} | **{f['held']}** | {f['effect']} | {f['rule']} |")
    lines += ["", "A finding is held when every check shows the effect with its 95% interval clear of no effect and its "
              "size at least the rule's threshold; partly when some do. Every check's numbers: `results.json` → "
              "`findings`.", "", "## Figures", ""]
    for name, fig in results["analysis"].get("figures", {}).items():
        lines += [f"### {name}", "", f"![{name}]({fig})", "", _reading(name, results["findings"]), ""]
    meta = results["analysis"].get("meta", {})
    sources = meta.get("adversarial_sources") or {}
    reused = sorted(m for m, s in sources.items() if s != meta.get("adversarial"))
    if reused:
        lines += [f"Adversarial inputs in the analyses: the inputs each model's evaluation attacked "
                  f"(`<run>/eval/adversarial.npz`) for {len(reused)} of {len(sources)} models; "
                  f"{meta.get('adversarial')} otherwise.", ""]
    elif meta.get("adversarial"):
        lines += [f"Adversarial inputs in the analyses: {meta['adversarial']}.", ""]
    return "\n".join(lines)


def write(report_dir: str, results: dict, config: dict | None = None) -> None:
    """``results.json``, ``REPORT.md`` and the attack-sweep figures drawn from the evaluation metrics
    (``attack_budget.png``, ``attack_k.png``, listed after the analysis figures) in ``report_dir``;
    the JSON and Markdown are written atomically."""
    from safety_mech.analysis import figures  # matplotlib: only when a report is written

    # sanitize first (NumPy scalars -> plain, NaN -> null), then anything else JSON lacks as text
    clean = json.loads(json.dumps(files.sanitize({**results, "config": config}), default=str))
    files.write_json(os.path.join(report_dir, "results.json"), clean)
    shown = {**results["analysis"].get("figures", {}), **figures.attack_figures(results["eval"], report_dir)}
    files.write_text(os.path.join(report_dir, "REPORT.md"),
                     markdown({**results, "analysis": {**results["analysis"], "figures": shown}}, config))

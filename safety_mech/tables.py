"""Metric keys, model names and the paper-shaped tables (Markdown) of evaluation metrics.

A model is one replica of a run, named ``<method>/lr=<peak lr>/seed=<seed>`` (``replicas.names``;
method: the run's ``method.name``, ``pretrain`` for a pretraining run, or a name given by hand).
Metric keys are ``<model>/<set>/<metric>`` with companions ``..._lo`` / ``..._hi`` (the 95%
interval) and ``<model>/<set>/n`` (examples used). The attack's keys are
``<model>/adversarial/<metric>`` (default k and budget), ``<model>/adversarial/budget=<b>/...`` and
``<model>/adversarial/k=<k>/...`` (sweeps), with ``.../n`` and ``.../n_truncated`` (examples whose
targets were cut at the end of learned positions, see ``attacks``).
"""
from __future__ import annotations

import re

from safety_mech.metrics import wilson_interval

_MODEL_RE = r"^(?P<model>[^/]+/lr=[^/]+/seed=[^/]+)/(?P<rest>.+)$"
# (header, set, metric) of the paper's table
TABLE_COLUMNS = (("Instruct (safe)", "safe", "gen_instruct"), ("Null (unsafe)", "unsafe", "gen_null"),
                 ("JB-CO-Task", "jb_co_task", "gen_strict"), ("JB-CO-Text", "jb_co_text", "gen_strict"),
                 ("JB-MisGen-Text", "jb_misgen_text", "gen_strict"),
                 ("JB-MisGen-Tokens", "jb_misgen_tokens", "gen_strict"),
                 ("Adversarial", "adversarial", "gen_strict"))
TABLE_CAPTION = ("Percent of examples, mean [95% interval] (Wilson). Instruct: the greedy response equals the "
                 "true output on safe inputs; Null: it is the refusal on unsafe inputs; the other columns: "
                 "strict attack success (not the refusal and the harmful output) on the jailbreak sets and "
                 "under the soft-token attack (k = 2 soft tokens, budget 1, on the unsafe inputs).")


def split_key(key: str):
    """``(model, rest)`` of a metric key, or None when it does not follow the scheme."""
    m = re.match(_MODEL_RE, key)
    return (m["model"], m["rest"]) if m else None


def _cell(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "–"
    m, lo, hi = (100 * metrics.get(key + s, float("nan")) for s in ("", "_lo", "_hi"))
    return f"{m:.1f} [{lo:.1f}, {hi:.1f}]"


def _models(metrics: dict) -> list[str]:
    seen = {}
    for key in metrics:
        parts = split_key(key)
        if parts:
            seen.setdefault(parts[0], None)
    return list(seen)


def _row_label(model: str, models: list[str]) -> str:
    method, lr, seed = model.split("/")
    same = [m for m in models if m.split("/")[:2] == [method, lr]]
    label = f"{method}, {lr.replace('lr=', 'η=')}"
    return label + (f", {seed}" if len(same) > 1 else "")


def paper_table(metrics_dicts) -> str:
    """The paper's table (Markdown) from one or more flat metrics dicts (``<run>/eval/metrics.json``
    of several runs): a row per model (method × learning rate, × seed when a run has several),
    columns Instruct on ``safe``, Null on ``unsafe``, strict attack success on the four jailbreak
    sets and the soft-token attack; cells are ``mean [lo, hi]`` in percent, ``–`` where missing."""
    metrics = _merge(metrics_dicts)
    models = _models(metrics)
    lines = ["| model | " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |",
             "|---|" + "---|" * len(TABLE_COLUMNS)]
    for model in models:
        cells = [_cell(metrics, f"{model}/{s}/{m}") for _, s, m in TABLE_COLUMNS]
        lines.append(f"| {_row_label(model, models)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SEED_MEAN_CAPTION = ("Mean over seeds, percent [95% Wilson interval of the seeds' inputs pooled]; the rows per "
                     "seed follow.")


def _pooled_cell(metrics: dict, models: list[str], rest: str) -> str:
    """Mean over ``models`` of one rate and the Wilson interval of their pooled examples."""
    have = [m for m in models if f"{m}/{rest}" in metrics]
    if not have:
        return "–"
    set_name = rest.split("/")[0]
    p = [metrics[f"{m}/{rest}"] for m in have]
    n = [metrics.get(f"{m}/{set_name}/n", float("nan")) for m in have]
    lo, hi = wilson_interval(sum(pi * ni for pi, ni in zip(p, n)), sum(n))
    return f"{100 * sum(p) / len(p):.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def seed_mean_table(metrics_dicts) -> str:
    """The paper's table with a row per method × learning rate: each cell the mean over the seeds
    (:data:`SEED_MEAN_CAPTION`)."""
    metrics = _merge(metrics_dicts)
    groups: dict = {}
    for model in _models(metrics):
        method, lr, _ = model.split("/")
        groups.setdefault(f"{method}, {lr.replace('lr=', 'η=')}", []).append(model)
    lines = ["| model (seeds) | " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |",
             "|---|" + "---|" * len(TABLE_COLUMNS)]
    for label, models in groups.items():
        cells = [_pooled_cell(metrics, models, f"{s}/{m}") for _, s, m in TABLE_COLUMNS]
        lines.append(f"| {label} ({len(models)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_table(metrics_dicts, axis: str = "budget", metric: str = "gen_strict") -> str:
    """Soft-token attack ``metric`` (percent, mean [lo, hi]) against the budget multiplier
    (``axis="budget"``) or the number of soft tokens (``axis="k"``): a row per model, a column per
    swept value found in the metrics; empty string when there is no sweep."""
    metrics = _merge(metrics_dicts)
    models = _models(metrics)
    prefix, values = f"adversarial/{axis}=", set()
    for key in metrics:
        parts = split_key(key)
        if parts and parts[1].startswith(prefix) and parts[1].endswith(f"/{metric}"):
            values.add(float(parts[1][len(prefix):].split("/")[0]))
    if not values:
        return ""
    values = sorted(values)
    lines = ["| model | " + " | ".join(f"{axis}={v:g}" for v in values) + " |", "|---|" + "---|" * len(values)]
    for model in models:
        cells = [_cell(metrics, f"{model}/adversarial/{axis}={v:g}/{metric}") for v in values]
        lines.append(f"| {_row_label(model, models)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _merge(metrics_dicts) -> dict:
    if isinstance(metrics_dicts, dict):
        return metrics_dicts
    merged = {}
    for d in metrics_dicts:
        merged.update(d)
    return merged

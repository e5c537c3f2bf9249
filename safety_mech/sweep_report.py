"""A sweep's comparison: every point with its overrides and metrics, ``comparison.md`` and
``comparison.json`` in the sweep's work directory, and a plot of the first metric along one axis.

A point's value of a metric is the mean over the models it holds (its replicas: ``replicas.names``)
with a 95% interval: Student's t over its models when it has several, the Wilson interval of
``results.json`` for one model's rate in the study stage, none otherwise. Points that differ only in
their seeds form a *setting*; the settings table pools their models (mean and t-interval over seeds).
Points whose runs have not finished are listed without values.
"""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from safety_mech import files, metrics as metrics_lib, sweeps  # noqa: E402
from safety_mech.runs import RunDir, RunError  # noqa: E402


def _final(path: str) -> dict:
    record = RunDir.open(path).metrics.final()
    if not record:
        raise RunError(f"{path}: no final metrics record")
    return record


def _lookup(table: dict, key: str, where: str):
    if key not in table:
        close = [k for k in table if k.rsplit("/", 1)[-1] == key.rsplit("/", 1)[-1]][:3]
        raise RunError(f"metric {key!r} is not in {where}" + (f" (there: {', '.join(close)}, ...)" if close else ""))
    return table[key]


def point_values(workdir: str, sweep, stage: str, run, point: int) -> dict:
    """``{metric: {model: (value, lo, hi)}}`` of one point of a finished run."""
    d, cfg = sweeps.run_dir(workdir, stage, run), sweep.points[point]
    point_cfg = sweeps.apply(sweep.config, cfg, f"point {point + 1}")
    out = {}
    if stage == "study":
        results = files.read_json(os.path.join(d, "report", "results.json"))
    for metric in sweep.metrics[stage]:
        head, _, rest = metric.partition("/")
        values = {}
        if stage == "pretrain":
            names = sweeps.models(run.config, "pretrain")
            if head == "probe":
                table = files.read_json(os.path.join(d, "probes.json"))
                values = {m: (table[m][rest],) * 3 for m in sweeps.models(point_cfg, "pretrain")}
            else:
                record = _final(d)
                column = _lookup(record, metric, f"{d}/metrics.jsonl")
                values = {m: (column[names.index(m)],) * 3 for m in sweeps.models(point_cfg, "pretrain")}
        elif stage == "finetune":
            names = sweeps.models(run.config, head)
            column = _lookup(_final(os.path.join(d, head)), rest, f"{d}/{head}/metrics.jsonl")
            values = {m: (column[names.index(m)],) * 3 for m in sweeps.models(point_cfg, head)}
        elif head == "findings":
            held = float(bool(_lookup(results["findings"], rest, "results.json's findings")["held"]))
            values = {f"point {point + 1}": (held,) * 3}  # one value per study
        elif head == "pretrain":
            v = _lookup(results["pretrain"], rest, "results.json's pretrain")
            v = v[0] if isinstance(v, list) else v
            values = {f"point {point + 1}": (v,) * 3}
        else:
            for m in sweeps.models(point_cfg, head):
                key = f"{m}/{rest}"
                v = _lookup(results["eval"], key, "results.json's eval")
                values[m] = (v, results["eval"].get(f"{key}_lo", v), results["eval"].get(f"{key}_hi", v))
        out[metric] = values
    return out


def summarize(per_model: dict) -> dict:
    """Mean and interval of one metric over a point's (or setting's) models."""
    vals = [v[0] for v in per_model.values()]
    if len(vals) == 1:
        v, lo, hi = next(iter(per_model.values()))
        return {"mean": v, "lo": lo, "hi": hi, "n": 1}
    mean, lo, hi = metrics_lib.t_mean_interval(vals)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(vals)}


def collect(workdir: str, sweep, stage: str, runs) -> dict:
    """The comparison of every point (see the module docstring)."""
    rows = []
    for run in runs:
        finished = sweeps.done(workdir, sweep, stage, run)
        for i in run.points:
            per = point_values(workdir, sweep, stage, run, i) if finished else {}
            rows.append({"point": i + 1, "overrides": {k: sweeps.normalize(k, v) for k, v in sweep.points[i].items()},
                         "run": run.name, "done": finished, "per_model": per,
                         "values": {m: summarize(v) for m, v in per.items()}})
    rows.sort(key=lambda r: r["point"])
    settings: dict = {}
    for r in rows:
        rest = {k: v for k, v in r["overrides"].items() if not k.endswith(sweeps.SEED_KEY)}
        s = settings.setdefault(json.dumps(rest, sort_keys=True, default=str),
                                {"overrides": rest, "points": [], "per_model": {}})
        s["points"].append(r["point"])
        if r["done"]:
            for m, per in r["per_model"].items():
                s["per_model"].setdefault(m, {}).update(per)
    setting_rows = []
    for s in settings.values():
        all_done = all(rows[p - 1]["done"] for p in s["points"])
        setting_rows.append({"overrides": s["overrides"], "points": s["points"], "done": all_done,
                             "values": {m: summarize(v) for m, v in s["per_model"].items()} if all_done else {}})
    return {"sweep": sweep.name, "stage": stage, "metrics": list(sweep.metrics[stage]), "n_points": len(rows),
            "n_done": sum(r["done"] for r in rows), "points": rows, "settings": setting_rows}


def _cell(v: dict | None) -> str:
    if not v:
        return "–"
    if v["lo"] == v["hi"]:
        return f"{v['mean']:.3f}"
    return f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"


def _table(rows, keys, short, metrics, first: str) -> list[str]:
    head = [first] + [short[k] for k in keys] + list(metrics)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = str(r["point"]) if "point" in r else ",".join(map(str, r["points"]))
        cells = [label] + [sweeps.fmt_value(r["overrides"][k]) if k in r["overrides"] else "(base)" for k in keys]
        lines.append("| " + " | ".join(cells + [_cell(r["values"].get(m)) for m in metrics]) + " |")
    return lines


def markdown(table: dict) -> str:
    keys = list(dict.fromkeys(k for r in table["points"] for k in r["overrides"]))
    short = sweeps.short_keys(keys)
    lines = [f"# Sweep `{table['sweep']}` (stage {table['stage']}): {table['n_done']} of {table['n_points']} "
             "points done", "",
             "Each metric: mean over the point's models [95% interval] (`safety_mech/sweep_report.py`); "
             "– not finished.", ""]
    lines += _table(table["points"], keys, short, table["metrics"], "point") + [""]
    if any(len(s["points"]) > 1 for s in table["settings"]):
        seedless = [k for k in keys if not k.endswith(sweeps.SEED_KEY)]
        lines += ["## Over seeds", "", "Points that differ only in their seeds, pooled: mean [95% t-interval].", ""]
        lines += _table(table["settings"], seedless, short, table["metrics"], "points") + [""]
    return "\n".join(lines)


def plot(table: dict, key: str, metric: str, path: str) -> str | None:
    """``metric`` (mean and interval over seeds) along ``key``, one line per combination of the other
    swept keys; None when no setting has finished."""
    done = [s for s in table["settings"] if s["done"] and metric in s["values"]]
    if not done:
        return None
    xs = list(dict.fromkeys(sweeps.fmt_value(s["overrides"].get(key, "(base)")) for s in done))
    numeric = all(_is_number(x) for x in xs)
    # keys that move with ``key`` (zipped with it) do not split the lines
    follows = {k for s in done for k in s["overrides"] if k != key and len({
        sweeps.fmt_value(t["overrides"].get(k)) for t in done
        if t["overrides"].get(key) == s["overrides"].get(key)}) == 1 and len({
        sweeps.fmt_value(t["overrides"].get(k)) for t in done}) == len(xs)}
    series: dict = {}
    for s in done:
        label = ", ".join(f"{k}={sweeps.fmt_value(v)}" for k, v in s["overrides"].items()
                          if k != key and k not in follows) or metric
        x = sweeps.fmt_value(s["overrides"].get(key, "(base)"))
        series.setdefault(label, []).append((float(x) if numeric else xs.index(x), s["values"][metric]))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    fig.subplots_adjust(left=0.1, right=0.62, bottom=0.16, top=0.9)
    for label, pts in series.items():
        pts.sort(key=lambda p: p[0])
        x = np.array([p[0] for p in pts])
        v = [p[1] for p in pts]
        mean = np.array([p["mean"] for p in v])
        err = np.array([[p["mean"] - p["lo"] for p in v], [p["hi"] - p["mean"] for p in v]])
        ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=label)
    if not numeric:
        ax.set_xticks(range(len(xs)), xs)
    ax.set(xlabel=key, ylabel=metric, title=f"sweep {table['sweep']}")
    fig.legend(loc="center left", bbox_to_anchor=(0.63, 0.5), fontsize=7, frameon=False)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def write(workdir: str, sweep, stage: str, runs) -> dict:
    """Collect the comparison, write ``comparison.md``, ``comparison.json`` and ``plot.png``."""
    table = collect(workdir, sweep, stage, runs)
    files.write_json(os.path.join(workdir, "comparison.json"), files.sanitize(table), indent=1)
    files.write_text(os.path.join(workdir, "comparison.md"), markdown(table))
    keys = [k for r in table["points"] for k in r["overrides"] if not k.endswith(sweeps.SEED_KEY)]
    key = sweep.plot or (keys[0] if keys else None)
    if key and table["metrics"]:
        plot(table, key, table["metrics"][0], os.path.join(workdir, "plot.png"))
    return table

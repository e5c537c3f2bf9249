"""Config-driven sweeps: many variants of the study config, run with one command, compared in one table.

A sweep file (``configs/sweeps/<name>.py``) defines ``get_sweep()`` returning a dict:

    config   a ``configs/reproduce.py`` config: the base of every point
    points   a list of overrides, ``{dotted key: value}`` (build them with :func:`axis`,
             :func:`product`, :func:`zipped`, or write them out)
    metrics  what the comparison table shows (:data:`METRIC_FORMS`): a tuple for ``stage``, or a
             dict ``{stage: tuple}`` for a sweep meant for several stages
    stage    the default ``--stage``: ``pretrain`` | ``finetune`` | ``study``
    methods  (optional) the methods the finetune stage trains; default all three
    plot     (optional) the key along which the first metric is plotted; default the first swept key
    probe_n  (optional) inputs per set of the ``probe/...`` metrics (default 4000)

What a stage runs for each point: ``pretrain`` the point's ``config.pretrain``; ``finetune`` its
fine-tuning runs from its base (the shipped base ``config.base``, or a pretraining run shared by the
points with the same ``pretrain.*`` overrides); ``study`` the whole study (``study.reproduce``).

Points that differ only in learning rates or seeds (``*.opt.lrs``, ``*.train.seeds``; a scalar is
read as a one-element tuple) are one run of replicas (``replicas.py``), when together they form a
full learning-rate × seed grid. Each run lives in ``<workdir>/<name from its overrides>``
(pretraining runs in ``<workdir>/pretrain/<name>``, where the finetune stage finds them). Every
point is applied and validated before any work; rerunning skips finished runs and resumes
interrupted ones; ``comparison.md`` / ``comparison.json`` (``sweep_report.py``) are rewritten after
every finished run.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools
import os
import time
from collections.abc import Sequence

import ml_collections
from absl import logging

from safety_mech import files, findings, replicas, setups, study
from safety_mech.train import fmt_duration
from safety_mech.analysis import probes
from safety_mech.runs import RunDir, check_new_or_same
from safety_mech.setups import ConfigError

STAGES = ("pretrain", "finetune", "study")
STAGE_GROUPS = {"pretrain": ("pretrain",), "finetune": ("base", "pretrain", "finetune"),
                "study": ("base", "pretrain", "finetune", "evaluate", "analyze")}
REPLICA_KEYS = ("opt.lrs", "train.seeds")
SEED_KEY = "train.seeds"
PROBE_METRICS = ("text_branch", "unsafe_vs_safe")
METRIC_FORMS = {
    "pretrain": "eval/<set>/<metric> or train/<metric> (the final metrics record), probe/text_branch or "
                "probe/unsafe_vs_safe (analysis.probes)",
    "finetune": "<method>/eval/<set>/<metric> or <method>/train/<metric> (the method's final metrics record)",
    "study": "<method>/<set>/<metric> (results.json's eval, e.g. ssft/unsafe/gen_null), pretrain/<key>, "
             "findings/<id> (1 if held)",
}
SWEEP_KEYS = ("config", "points", "metrics", "stage", "methods", "plot", "probe_n")


# ----------------------------------------------------------------------------------------------
# Writing points
# ----------------------------------------------------------------------------------------------

def axis(key: str, values) -> list[dict]:
    """One point per value of ``key``."""
    return [{key: v} for v in values]


def product(*axes: list[dict]) -> list[dict]:
    """Every combination of one point of each axis (the first axis varies slowest)."""
    return [{k: v for point in combo for k, v in point.items()} for combo in itertools.product(*axes)]


def zipped(*axes: list[dict]) -> list[dict]:
    """The i-th points of every axis merged (axes of one length)."""
    if len({len(a) for a in axes}) > 1:
        raise ValueError(f"zipped axes differ in length: {[len(a) for a in axes]}")
    return [{k: v for point in combo for k, v in point.items()} for combo in zip(*axes)]


# ----------------------------------------------------------------------------------------------
# Reading and planning
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Sweep:
    name: str
    config: ml_collections.ConfigDict
    points: list[dict]
    metrics: dict[str, tuple[str, ...]]  # by stage
    stage: str
    methods: tuple[str, ...] = study.METHODS
    plot: str | None = None
    probe_n: int = 4000


@dataclasses.dataclass
class Run:
    """One run directory of the sweep: the points it holds and the config it trains."""
    name: str
    overrides: dict
    config: ml_collections.ConfigDict
    points: list[int]  # indices into Sweep.points


def load(path: str) -> Sweep:
    """The sweep file at ``path``; any problem is a one-line ``ConfigError``."""
    where = f"--sweep {path}"
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file")
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        spec = importlib.util.spec_from_file_location(f"sweep_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        d = module.get_sweep() if hasattr(module, "get_sweep") else None
    except Exception as e:  # noqa: BLE001 (anything a user's file raises becomes one line)
        raise ConfigError(f"{where}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: get_sweep() must exist and return a dict with keys {SWEEP_KEYS[:4]}")
    unknown, missing = sorted(set(d) - set(SWEEP_KEYS)), [k for k in SWEEP_KEYS[:4] if k not in d]
    if unknown or missing:
        raise ConfigError(f"{where}: get_sweep() " + (f"has unknown key(s) {unknown}" if unknown else
                                                        f"lacks {missing}") + f"; use {SWEEP_KEYS}")
    if not isinstance(d["config"], ml_collections.ConfigDict):
        raise ConfigError(f"{where}: 'config' must be a ConfigDict (configs/reproduce.py's get_config)")
    points = d["points"]
    if not points or not all(isinstance(p, dict) for p in points):
        raise ConfigError(f"{where}: 'points' must be a non-empty list of override dicts")
    methods = tuple(d.get("methods", study.METHODS))
    if not methods or set(methods) - set(study.METHODS):
        raise ConfigError(f"{where}: 'methods' must be a subset of {study.METHODS}, got {methods}")
    metrics = d["metrics"] if isinstance(d["metrics"], dict) else {d["stage"]: d["metrics"]}
    if set(metrics) - set(STAGES) or not all(isinstance(v, (tuple, list)) for v in metrics.values()):
        raise ConfigError(f"{where}: 'metrics' must be a tuple of names, or a dict of them by stage {STAGES}")
    metrics = {k: tuple(v) for k, v in metrics.items()}
    return Sweep(name, d["config"], [dict(p) for p in points], metrics, str(d["stage"]), methods,
                 d.get("plot"), int(d.get("probe_n", 4000)))


def is_replica_key(key: str) -> bool:
    return key.endswith(REPLICA_KEYS)


def normalize(key: str, value):
    """Lists as tuples; a scalar learning rate or seed as a one-element tuple."""
    if isinstance(value, list):
        value = tuple(value)
    if is_replica_key(key) and not isinstance(value, tuple):
        value = (value,)
    return value


def apply(config: ml_collections.ConfigDict, overrides: dict, where: str) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``overrides`` set; an unknown key or a value of the wrong type is a
    one-line ``ConfigError`` starting with ``where``."""
    cfg = copy.deepcopy(config)
    for key, value in overrides.items():
        parts = str(key).split(".")
        missing = setups.missing_key(cfg, parts)
        if missing:
            above, _, hint = missing
            raise ConfigError(f"{where}: unknown key {key!r}" +
                              (f"; did you mean {'.'.join(above + [hint])!r}?" if hint else ""))
        node = cfg
        for part in parts[:-1]:
            node = node[part]
        if isinstance(node[parts[-1]], ml_collections.ConfigDict):
            raise ConfigError(f"{where}: {key!r} is a group; override its keys")
        try:
            node[parts[-1]] = normalize(key, value)
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: {key}={value!r}: {' '.join(str(e).split())}") from None
    return cfg


def kinds(sweep: Sweep, stage: str) -> tuple[str, ...]:
    """The runs of replicas a point trains: ``pretrain`` or its fine-tuning methods."""
    return ("pretrain",) if stage == "pretrain" else sweep.methods if stage == "finetune" else study.METHODS


def group_of(kind: str) -> str:
    return "pretrain" if kind == "pretrain" else f"finetune.{kind}"


def models(cfg, kind: str) -> list[str]:
    """Replica names of ``kind``'s run under ``cfg`` (``replicas.names``)."""
    node = cfg.pretrain if kind == "pretrain" else cfg.finetune[kind]
    return replicas.names(kind, node.opt.lrs, node.train.seeds)


def _check_metric(metric: str, sweep: Sweep, stage: str) -> None:
    head, _, rest = metric.partition("/")
    ok = {"pretrain": head in ("eval", "train") and rest or head == "probe" and rest in PROBE_METRICS,
          "finetune": head in sweep.methods and rest.startswith(("eval/", "train/")),
          "study": (head in study.METHODS or head == "pretrain") and rest
          or head == "findings" and rest in {f[0] for f in findings.FINDINGS}}[stage]
    if not ok:
        raise ConfigError(f"metric {metric!r} is not one --stage {stage} gives; use {METRIC_FORMS[stage]}")


def _validate(cfg, stage: str, where: str) -> None:
    try:
        if stage == "pretrain":
            setups.validate_pretrain(cfg.pretrain)
        else:
            study.validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def plan(sweep: Sweep, stage: str | None = None) -> list[Run]:
    """Every point applied and validated, grouped into runs (see the module docstring)."""
    stage = stage or sweep.stage
    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r}: use one of {STAGES}")
    if stage not in sweep.metrics:
        raise ConfigError(f"the sweep names no metrics for --stage {stage} (it has {sorted(sweep.metrics)})")
    for metric in sweep.metrics[stage]:
        _check_metric(metric, sweep, stage)
    allowed = STAGE_GROUPS[stage]
    points, cfgs = [], []
    for i, raw in enumerate(sweep.points):
        where = f"point {i + 1} of {len(sweep.points)}"
        for key in raw:
            parts = str(key).split(".")
            if parts[0] not in allowed or (stage == "finetune" and parts[0] == "finetune" and len(parts) > 1
                                           and parts[1] not in sweep.methods):
                raise ConfigError(f"{where}: {key}: --stage {stage} does not run it (it runs config.{'/'.join(allowed)}"
                                  + (f", methods {sweep.methods}" if stage == "finetune" else "") + ")")
        cfg = apply(sweep.config, raw, where)
        _validate(cfg, stage, where)
        points.append({k: normalize(k, v) for k, v in raw.items()})
        cfgs.append(cfg)
    for i, j in itertools.combinations(range(len(points)), 2):
        if points[i] == points[j]:
            raise ConfigError(f"points {i + 1} and {j + 1} are the same ({points[i]})")
    replica_keys = {f"{group_of(kind)}.{rkey}" for kind in kinds(sweep, stage) for rkey in REPLICA_KEYS}
    by_rest: dict = {}
    for i, p in enumerate(points):
        rest = tuple(sorted((k, repr(v)) for k, v in p.items() if k not in replica_keys))
        by_rest.setdefault(rest, []).append(i)
    runs = []
    for members in by_rest.values():
        merged = _merge(sweep, stage, points, cfgs, members, replica_keys)
        runs.extend([merged] if merged else [Run("", points[i], cfgs[i], [i]) for i in members])
    _name_runs(runs, points, replica_keys)
    return runs


def _merge(sweep, stage, points, cfgs, members, replica_keys) -> Run | None:
    """One run of replicas for ``members`` (points differing only in the stage's ``replica_keys``) if
    together they make a full lrs × seeds grid of every kind, else None."""
    if len(members) == 1:
        return None
    overrides = {k: v for k, v in points[members[0]].items() if k not in replica_keys}
    swept = [kind for kind in kinds(sweep, stage)  # the kinds whose replicas the points set
             if any(f"{group_of(kind)}.{rkey}" in points[i] for i in members for rkey in REPLICA_KEYS)]
    for kind in swept:
        nodes = [cfgs[i].pretrain if kind == "pretrain" else cfgs[i].finetune[kind] for i in members]
        for rkey in REPLICA_KEYS:
            values = [node.opt.lrs if rkey == "opt.lrs" else node.train.seeds for node in nodes]
            overrides[f"{group_of(kind)}.{rkey}"] = tuple(dict.fromkeys(x for v in values for x in v))
    cfg = apply(sweep.config, overrides, "merged run")
    for kind in swept:
        covered = [m for i in members for m in models(cfgs[i], kind)]
        if len(covered) != len(set(covered)) or set(covered) != set(models(cfg, kind)):
            return None
    return Run("", overrides, cfg, list(members))


def short_keys(keys) -> dict:
    """Each dotted key's shortest suffix that no other key ends with."""
    keys = list(dict.fromkeys(keys))
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(k != key and (k == suffix or k.endswith("." + suffix)) for k in keys):
                break
        out[key] = suffix
    return out


def fmt_value(v) -> str:
    if isinstance(v, (tuple, list)):
        return "+".join(fmt_value(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def name_of(overrides: dict, short: dict) -> str:
    """``key=value`` pairs (short keys) joined by commas; ``base`` for no overrides."""
    text = ",".join(f"{short[k]}={fmt_value(v)}" for k, v in overrides.items())
    return text.replace("/", "_").replace(" ", "") or "base"


def _name_runs(runs: list[Run], points: list[dict], replica_keys) -> None:
    short = short_keys(k for p in points for k in p)
    for r in runs:
        r.name = name_of({k: v for k, v in r.overrides.items() if k not in replica_keys}, short)
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = name_of(r.overrides, short)


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def run_dir(workdir: str, stage: str, run: Run) -> str:
    """``<workdir>/<name>``; pretraining runs in ``<workdir>/pretrain/<name>``, where the finetune
    stage looks for its bases."""
    return os.path.join(workdir, "pretrain", run.name) if stage == "pretrain" else os.path.join(workdir, run.name)


def pretrain_dir(workdir: str, sweep: Sweep, run: Run) -> str:
    """The base of a finetune-stage run: the shipped base, or the pretraining run of its
    ``pretrain.*`` overrides (shared by the runs that have the same)."""
    shipped = study.shipped_base(run.config)
    if shipped:
        return shipped
    own = {k: v for k, v in run.overrides.items() if k.startswith("pretrain.")}
    return os.path.join(workdir, "pretrain", name_of(own, short_keys(k for p in sweep.points for k in p)))


def done(workdir: str, sweep: Sweep, stage: str, run: Run) -> bool:
    """Whether ``run`` has finished in ``workdir``; a finished pretraining run of another config (the
    sweep file changed) is a ``RunError`` naming the keys."""
    d = run_dir(workdir, stage, run)
    if stage == "pretrain":
        if os.path.exists(os.path.join(d, "config.json")):
            check_new_or_same(d, run.config.pretrain.to_dict())
        return study.finished(d) and (not _wants_probes(sweep) or os.path.exists(os.path.join(d, "probes.json")))
    if stage == "finetune":
        return all(study.finished(os.path.join(d, m)) for m in sweep.methods)
    return os.path.exists(os.path.join(d, "report", "results.json"))


def _wants_probes(sweep: Sweep) -> bool:
    return any(m.startswith("probe/") for m in sweep.metrics.get("pretrain", ()))


def write_probes(path: str, probe_n: int) -> None:
    """``probes.json`` of a pretraining run: :func:`probes.probe_accuracies` of every replica."""
    run = RunDir.open(path)
    params, setup = run.load_params(), run.setup
    out = {name: probes.probe_accuracies(replicas.select(params, r), setup.model, setup.data, probe_n)
           for r, name in enumerate(run.model_names())}
    files.write_json(os.path.join(path, "probes.json"), out)


def _train(workdir: str, sweep: Sweep, stage: str, run: Run, distributed: bool) -> None:
    d = run_dir(workdir, stage, run)
    if stage == "pretrain":
        if not study.finished(d):
            study.pretrain(run.config.pretrain, d, distributed=distributed)
        if _wants_probes(sweep):
            write_probes(d, sweep.probe_n)
    elif stage == "finetune":
        base = pretrain_dir(workdir, sweep, run)
        if not study.finished(base):
            study.pretrain(run.config.pretrain, base, distributed=distributed)
        for m in sweep.methods:
            if not study.finished(os.path.join(d, m)):
                study.finetune(run.config.finetune[m], base, os.path.join(d, m), distributed=distributed)
    else:
        study.reproduce(run.config, d, distributed=distributed, compilation_cache=False)


def run(sweep: Sweep, workdir: str, stage: str | None = None, *, only: Sequence[int] = (), distributed: bool = False,
        compilation_cache: bool = True, dry_run: bool = False) -> dict:
    """Run every point of ``sweep`` in ``workdir`` (see the module docstring), or only the runs
    holding the points numbered ``only`` (1-based); returns the comparison table
    (``sweep_report.collect``)."""
    from safety_mech import sweep_report

    stage = stage or sweep.stage
    runs = plan(sweep, stage)
    n = len(sweep.points)
    bad = [i for i in only if not 1 <= i <= n]
    if bad:
        raise ConfigError(f"--points {bad}: the sweep has points 1..{n}")
    chosen = {r.name for r in runs if not only or set(only) & {i + 1 for i in r.points}}
    for r in runs:
        logging.info("run %s: point(s) %s", r.name, ", ".join(str(i + 1) for i in r.points))
    if dry_run:
        return {}
    os.makedirs(workdir, exist_ok=True)
    if compilation_cache:
        study.enable_compilation_cache(os.path.join(workdir, ".jax_cache"))
    table = sweep_report.write(workdir, sweep, stage, runs)
    times: list[float] = []
    for k, r in enumerate(runs):
        if r.name not in chosen:
            continue
        finished = sum(len(x.points) for x in runs if done(workdir, sweep, stage, x))
        if done(workdir, sweep, stage, r):
            logging.info("== sweep %s: run %d/%d %s finished earlier, skipped", sweep.name, k + 1, len(runs), r.name)
            continue
        left = sum(1 for x in runs[k:] if x.name in chosen and not done(workdir, sweep, stage, x))
        eta = f", ETA {fmt_duration(left * sum(times) / len(times))}" if times else ""
        logging.info("== sweep %s: run %d/%d %s (points %s; %d of %d points done%s)", sweep.name, k + 1, len(runs),
                     r.name, ",".join(str(i + 1) for i in r.points), finished, n, eta)
        t0 = time.perf_counter()
        _train(workdir, sweep, stage, r, distributed)
        times.append(time.perf_counter() - t0)
        table = sweep_report.write(workdir, sweep, stage, runs)
        logging.info("== sweep %s: run %s done in %s; comparison %s", sweep.name, r.name, fmt_duration(times[-1]),
                     os.path.join(workdir, "comparison.md"))
    return table

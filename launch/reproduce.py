"""The whole study in one command: pretrain -> SSFT, DPO, unlearning -> evaluation and the attack ->
analyses -> report.

    python -m launch.reproduce --workdir runs/repro                       # tiny preset (CPU default)
    python -m launch.reproduce --workdir runs/repro_paper --config configs/reproduce.py:paper

Stages, each a run directory under ``--workdir`` made by the single-stage launchers' ``run``
functions (so every stage can also be rerun or inspected on its own)::

    pretrain/                 launch.pretrain   (θ_IT)
    ssft/ dpo/ unlearn/       launch.finetune   (ηM and ηS as vmapped replicas, from pretrain/)
    <method>/eval/            launch.evaluate   (every set of SPEC §9 and the soft-token attack)
    analysis/                 launch.analyze    (SPEC §10 on the three fine-tuned runs vs pretrain/)
    report/                   REPORT.md, results.json and the figures

Rerunning skips finished stages (a training run whose last metrics line is its final one at its
last step; an evaluation or analysis whose output file exists); an interrupted run resumes: training
from its latest checkpoint, evaluation and analysis from scratch (their files are written
atomically at the end). The config (``configs/reproduce.py``) is checked completely, fine-tuning
configs included, before any work starts; a workdir holding a run of another config is a one-line
error (``launch.common.check_workdir``). ``timings.json`` records each stage's wall time.

Compiled programs are cached on disk in ``<workdir>/.jax_cache`` (JAX's persistent compilation
cache): the three evaluations, the fine-tuning runs' final evaluations and a rerun compile the same
programs, so all but the first are cache hits. ``JAX_COMPILATION_CACHE_DIR`` set by the user wins;
``--nocompilation_cache`` turns it off.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import jax
from absl import app, flags, logging

from configs import pretrain as pretrain_config
from configs import reproduce as reproduce_config
from launch import analyze as launch_analyze
from launch import common
from launch import evaluate as launch_evaluate
from launch import finetune as launch_finetune
from launch import pretrain as launch_pretrain
from safety_mech import data as data_lib
from safety_mech import report as report_lib
from safety_mech import train as train_lib

METHODS = reproduce_config.METHODS
EVALUATE_KEYS = ("sets", "n", "attack", "attack_n", "attack_steps", "sweep_budget", "sweep_k")
ANALYZE_KEYS = ("n", "sets", "alphas", "alpha_modes", "seed", "energy", "batch_size")


def _check_group(cfg, group: str, keys) -> dict:
    values = cfg[group].to_dict()
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise train_lib.ConfigError(f"config.{group}: unknown key(s) {unknown}; known: {list(keys)}")
    return values


def validate(cfg):
    """Every group of ``cfg`` checked (one-line ``ConfigError``); returns the fine-tuning setups
    (``reproduce_config.finetune_configs``) and the evaluate and analyze arguments."""
    unknown = sorted(set(cfg.keys()) - set(reproduce_config.GROUPS))
    missing = sorted(set(reproduce_config.GROUPS) - set(cfg.keys()))
    if unknown or missing:
        raise train_lib.ConfigError(f"config groups must be {reproduce_config.GROUPS}; unknown {unknown}, "
                                    f"missing {missing}")
    if sorted(cfg.finetune.keys()) != sorted(METHODS):
        raise train_lib.ConfigError(f"config.finetune must hold exactly {list(METHODS)}, got {sorted(cfg.finetune.keys())}")
    pretrain_config.validate(cfg.pretrain)
    finetune = reproduce_config.finetune_configs(cfg)
    ev = _check_group(cfg, "evaluate", EVALUATE_KEYS)
    an = _check_group(cfg, "analyze", ANALYZE_KEYS)
    bad_sets = [s for s in ev["sets"] if s not in data_lib.EVAL_SETS]
    if bad_sets:
        raise train_lib.ConfigError(f"config.evaluate.sets: unknown {bad_sets}; choose from {data_lib.EVAL_SETS}")
    for group, values, names in (("evaluate", ev, ("n", "attack_n", "attack_steps")), ("analyze", an, ("batch_size",))):
        for name in names:
            if values[name] < 1:
                raise train_lib.ConfigError(f"config.{group}.{name} must be >= 1, got {values[name]}")
    if an["n"] < 2:
        raise train_lib.ConfigError(f"config.analyze.n must be >= 2, got {an['n']}")
    bad_sets = [s for s in an["sets"] if s not in data_lib.EVAL_SETS]
    if bad_sets or not {"safe", "unsafe"} <= set(an["sets"]):
        raise train_lib.ConfigError(f"config.analyze.sets {list(an['sets'])}: names from {data_lib.EVAL_SETS}, "
                                    "safe and unsafe included")
    ev["sets"], an["sets"] = tuple(ev["sets"]), tuple(an["sets"])
    return finetune, ev, an


def training_finished(run_dir: str, steps: int) -> bool:
    """Whether ``run_dir``'s metrics end with the final record of step ``steps``."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    last = None
    with open(path) as f:
        for line in f:
            if line.strip():
                last = line
    try:
        record = json.loads(last) if last else {}
    except json.JSONDecodeError:
        return False
    return bool(record.get("final")) and record.get("step") == steps


class Stages:
    """Runs stages in order, skipping finished ones, and records their wall times."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "timings.json")
        self.timings = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.timings = json.load(f)

    def __call__(self, name: str, done: bool, fn):
        if done:
            logging.info("== %s: finished earlier, skipped", name)
            return
        logging.info("== %s", name)
        t0 = time.perf_counter()
        fn()
        self.timings[name] = round(time.perf_counter() - t0, 1)
        logging.info("== %s done in %.0f s", name, self.timings[name])
        with open(self.path, "w") as f:
            json.dump(self.timings, f, indent=1)


def enable_compilation_cache(path: str):
    """Cache compiled programs in ``path`` unless a cache directory is already configured (by
    ``JAX_COMPILATION_CACHE_DIR`` or earlier code). Must run before the first compilation."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program that took a noticeable time to compile; tiny ones are cheaper to rebuild.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(cfg, workdir: str, *, distributed: bool = False, compilation_cache: bool = True) -> dict:
    """The whole study in ``workdir`` (see the module docstring); returns ``results.json``'s dict."""
    finetune, ev, an = validate(cfg)
    os.makedirs(workdir, exist_ok=True)
    if compilation_cache:
        enable_compilation_cache(os.path.join(workdir, ".jax_cache"))
    stage = Stages(workdir)
    t_start = time.perf_counter()
    pre_dir = os.path.join(workdir, "pretrain")
    stage("pretrain", training_finished(pre_dir, cfg.pretrain.train.steps),
          lambda: launch_pretrain.run(cfg.pretrain, pre_dir, distributed=distributed))
    ft_dirs = {m: os.path.join(workdir, m) for m in METHODS}
    for m in METHODS:
        stage(f"finetune/{m}", training_finished(ft_dirs[m], finetune[m][1].train.steps),
              lambda m=m: launch_finetune.run(cfg.finetune[m], pre_dir, ft_dirs[m], distributed=distributed))
    for m in METHODS:
        stage(f"evaluate/{m}", os.path.exists(os.path.join(ft_dirs[m], "eval", "metrics.json")),
              lambda m=m: launch_evaluate.run(ft_dirs[m], **ev))
    analysis_dir = os.path.join(workdir, "analysis")
    stage("analyze", os.path.exists(os.path.join(analysis_dir, "analysis.json")),
          lambda: launch_analyze.run(pre_dir, [ft_dirs[m] for m in METHODS], analysis_dir, **an))
    report_dir = os.path.join(workdir, "report")
    results = report_lib.collect(pre_dir, ft_dirs, analysis_dir, stage.timings)
    os.makedirs(report_dir, exist_ok=True)
    for fig in results["analysis"].get("figures", {}).values():
        shutil.copy(os.path.join(analysis_dir, fig), os.path.join(report_dir, fig))
    report_lib.write(report_dir, results, config=cfg.to_dict())
    logging.info("report: %s (this invocation %.0f s)", os.path.join(report_dir, "REPORT.md"),
                 time.perf_counter() - t_start)
    return results


COMPILATION_CACHE = flags.DEFINE_bool("compilation_cache", True,
                                      "cache compiled programs in <workdir>/.jax_cache (faster reruns and stages)")


def main(argv):
    # --config is launch.common's flag (shared by the launchers); without it, the tiny study
    cfg = lambda: common.CONFIG.value or reproduce_config.get_config("tiny")  # noqa: E731
    common.launch(argv, ("workdir",), lambda: run(cfg(), common.WORKDIR.value, distributed=common.DISTRIBUTED.value,
                                                  compilation_cache=COMPILATION_CACHE.value))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)

"""The study's stages, importable from a notebook: pretrain -> fine-tune -> evaluate -> analyze ->
report. Each launcher in ``launch/`` is flags -> one of these calls.

* :func:`pretrain` (SPEC §5) and :func:`finetune` (SPEC §7-8) train a run directory, or resume it
  from its latest checkpoint (same config, cadence keys excepted); a fine-tuned run records its base
  (path, step, replica, config) in ``config.json``, and every replica starts from the base's params
  with a fresh optimizer state; DPO's frozen reference is the base, never saved with the run.
* :func:`evaluate` is ``evaluation.evaluate_run``; :func:`analyze` is ``analysis.suite.analyze``.
* :func:`reproduce` runs the whole study in one work directory::

      pretrain/                 the pretrained model θ_IT (or the shipped base, ``config.base``)
      ssft/ dpo/ unlearn/       fine-tuned runs (learning rates × seeds as replicas)
      <method>/eval/            every set of SPEC §9 and the soft-token attack
      analysis/                 SPEC §10 on the three fine-tuned runs vs pretrain/
      report/                   REPORT.md, results.json and the figures

  Rerunning skips finished stages (a training run whose last metrics line is its final one at its
  last step; an evaluation or analysis whose output directory matches its SHA256SUMS) and resumes an interrupted one.
  The config (``configs/reproduce.py``) is checked completely before any work starts.
  ``timings.json`` records each stage's wall time. Compiled programs are cached in
  ``<workdir>/.jax_cache`` (JAX's persistent compilation cache) unless a cache is configured.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable

import jax
from absl import logging

from safety_mech import checkpoint as ckpt_lib
from safety_mech import data as data_lib
from safety_mech import bases, evaluation, files, finetune_losses, losses, packing, replicas, report, safety_data, setups
from safety_mech import metrics as metrics_lib
from safety_mech import model as model_lib
from safety_mech import optim
from safety_mech import sharding as sharding_lib
from safety_mech import train as train_lib
from safety_mech.analysis import suite
from safety_mech.runs import RunDir, RunError, check_new_or_same, config_diff, stage_output_done

METHODS = finetune_losses.METHODS


def make_run_mesh(batch_size: int, distributed: bool):
    """Initialise jax.distributed (behind the flag), then the mesh over every device; a batch that
    does not split over it is a one-line ``ConfigError``."""
    sharding_lib.maybe_initialize_distributed(distributed)
    mesh = sharding_lib.make_mesh()
    try:
        sharding_lib.check_batch_size(batch_size, mesh)
    except ValueError as e:
        raise setups.ConfigError(f"config.train.batch_size: {e}") from None
    return mesh


def train_job(setup, workdir: str, config_dict: dict, resume: bool, init_params_fn: Callable, loss_fn: Callable,
              sample_fn: Callable, *, mesh, ref_params: Any = None, tokens_per_example: int,
              deadline: float | None = None) -> dict:
    """Train ``setup`` (``setups.PretrainSetup`` or ``FinetuneSetup``) in ``workdir``: from its
    latest checkpoint if ``resume``, else from ``init_params_fn(key)`` per replica after writing
    ``config_dict`` as ``config.json``; past ``deadline`` (``time.monotonic()``) it saves and raises
    ``train.TimeBudgetReached``. Returns the final metrics record."""
    tc, lrs = setup.train, setup.opt.lrs
    R = len(lrs) * len(tc.seeds)
    optimizer = optim.make_optimizer(setup.opt)
    state = sharding_lib.put_replicated(train_lib.init_replicas(lrs, tc.seeds, init_params_fn, optimizer), mesh)
    manager = ckpt_lib.make_checkpoint_manager(ckpt_lib.checkpoint_dir(workdir), max_to_keep=tc.keep_checkpoints)
    try:
        if resume:
            state = ckpt_lib.restore_state(manager, state)
            logging.info("resuming %s from step %d", workdir, train_lib.host_step(state))
        elif jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            files.write_json(os.path.join(workdir, "config.json"), config_dict, indent=2, sort_keys=True)
        lr_fn = optim.make_lr_fn(setup.opt)
        pack = tc.pack
        if pack and jax.process_count() > 1:
            # the row plan is made on one host from the example lengths: several processes train unpacked
            logging.warning("config.train.pack=True is not supported with several processes; training unpacked")
            pack = False
        if pack:
            if loss_fn is not losses.lm_loss:
                raise RunError("config.train.pack=True applies to pretraining (lm_loss) only")
            step_fn = packing.make_packed_train_step(optimizer, sample_fn, setup.loss, mesh=mesh, lr_fn=lr_fn)
        else:
            step_fn = train_lib.make_train_step(loss_fn, optimizer, sample_fn, setup.loss, mesh=mesh, lr_fn=lr_fn)
        ec = setup.eval
        evaluator = metrics_lib.make_instruct_eval(setup.model, setup.data, jax.random.key(ec.seed),
                                                   max(ec.n_final, ec.n_periodic), sets=ec.sets,
                                                   chunk=min(ec.batch_size, ec.n_periodic), mesh=mesh)
        logging.info("%d replica(s) (lrs %s x seeds %s); %d devices", R, lrs, tc.seeds, mesh.size)
        _, final = train_lib.train(
            step_fn, state, n_steps=tc.steps, workdir=workdir, log_every=tc.log_every,
            eval_every=tc.eval_every, eval_fn=lambda p: evaluator(p, ec.n_periodic),
            final_eval_fn=lambda p: evaluator(p, ec.n_final), save_fn=lambda s: ckpt_lib.save_state(manager, s),
            ckpt_every=tc.ckpt_every, tokens_per_step=tokens_per_example * tc.batch_size * R, ref_params=ref_params,
            replica_names=[f"lr={lr:g},seed={seed}" for lr, seed in replicas.grid(lrs, tc.seeds)], deadline=deadline)
    finally:
        manager.close()
    return final


def pretrain(cfg, workdir: str, *, distributed: bool = False, deadline: float | None = None) -> dict:
    """Validate ``cfg`` (``configs/pretrain.py``), then train (or resume) in ``workdir``; returns the
    final metrics record (``deadline``: :func:`train_job`'s)."""
    setup = setups.validate_pretrain(cfg)
    config_dict = cfg.to_dict()
    resume = check_new_or_same(workdir, config_dict)
    mesh = make_run_mesh(setup.train.batch_size, distributed)
    init = lambda key: model_lib.init_params(key, setup.model)  # noqa: E731
    n_params = model_lib.count_params(jax.eval_shape(init, jax.random.key(0)), exclude_head=False)
    logging.info("pretraining model %s: %d parameters", setup.model, n_params)
    return train_job(setup, workdir, config_dict, resume, init, losses.lm_loss,
                     lambda key, step: data_lib.sample_pretrain_batch(key, setup.data, setup.train.batch_size, step),
                     mesh=mesh, tokens_per_example=setup.data.T, deadline=deadline)


def finetune(cfg, base: str, workdir: str, *, base_replica: int | None = None, distributed: bool = False,
             deadline: float | None = None) -> dict:
    """Fine-tune the base run ``base`` (a pretraining run, or a fine-tuned one for cross-method
    fine-tuning: ``base_replica`` picks its replica) with ``cfg`` (``configs/finetune.py``) in
    ``workdir``, or resume; returns the final metrics record (``deadline``: :func:`train_job`'s)."""
    if os.path.realpath(base) == os.path.realpath(workdir):
        raise RunError("--base and --workdir are the same directory")
    base_run = RunDir.open(base, "--base")
    step = base_run.latest_step()
    resolved = setups.inherit_from_base(cfg, base_run.config, f"--base {base}")
    setup = setups.validate_finetune(resolved)
    R_base = base_run.n_replicas
    if R_base > 1 and base_replica is None:
        raise RunError(f"--base {base} has {R_base} replicas; pick one with --base_replica 0..{R_base - 1}")
    replica = 0 if base_replica is None else base_replica
    record = {"path": base_run.path, "step": step, "replica": replica if R_base > 1 else None, "config": base_run.config}
    config_dict = {**resolved.to_dict(), "base": record}
    resume = check_new_or_same(workdir, config_dict)
    mesh = make_run_mesh(setup.train.batch_size, distributed)
    base_params = sharding_lib.put_replicated(base_run.replica_params(replica, step), mesh)
    method, batch_size = setup.method.name, setup.train.batch_size
    logging.info("%s fine-tuning from %s (step %d, replica %d)", method, base_run.path, step, replica)
    return train_job(
        setup, workdir, config_dict, resume, lambda k: base_params, finetune_losses.LOSSES[method],
        lambda key, s: safety_data.sample_finetune_batch(key, setup.data, batch_size), mesh=mesh,
        ref_params=base_params if method == "dpo" else None,  # the frozen reference: never in the state
        tokens_per_example=2 * setup.data.T,  # both completions of every example go through the model
        deadline=deadline)


evaluate = evaluation.evaluate_run
analyze = suite.analyze


class Stages:
    """Runs stages in order, skipping finished ones, and records their wall times.

    With a ``deadline`` (``time.monotonic()``): a training stage pauses at it (checkpoint saved,
    ``train.TimeBudgetReached``); a stage that cannot pause (evaluation, analysis) starts only as
    the first stage this process runs or while at least half of the process's budget is left, so
    that each process stays within its budget."""

    def __init__(self, workdir: str, deadline: float | None = None):
        self.path = os.path.join(workdir, "timings.json")
        self.timings = files.read_json(self.path) if os.path.exists(self.path) else {}
        self.deadline, self.ran = deadline, 0
        self.half_budget_at = None if deadline is None else (time.monotonic() + deadline) / 2

    def __call__(self, name: str, done: bool, fn, pausable: bool = False):
        if done:
            logging.info("== %s: finished earlier, skipped", name)
            return
        if self.deadline is not None and self.ran and not pausable and time.monotonic() > self.half_budget_at:
            raise train_lib.TimeBudgetReached(f"stage {name} cannot pause: it starts in the next run")
        logging.info("== %s", name)
        self.ran += 1
        t0, before = time.perf_counter(), self.timings.pop(f"{name} (so far)", 0.0)  # a paused stage's earlier runs
        try:
            fn()
        except train_lib.TimeBudgetReached:
            self.timings[f"{name} (so far)"] = round(before + time.perf_counter() - t0, 1)
            files.write_json(self.path, self.timings)
            raise
        self.timings[name] = round(before + time.perf_counter() - t0, 1)
        logging.info("== %s done in %.0f s", name, self.timings[name])
        files.write_json(self.path, self.timings)


def enable_compilation_cache(path: str) -> None:
    """Cache compiled programs in ``path`` unless a cache directory is already configured (by
    ``JAX_COMPILATION_CACHE_DIR`` or earlier code). Must run before the first compilation."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program that took a noticeable time to compile; tiny ones are cheaper to rebuild.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def validate(cfg) -> setups.StudySetup:
    """The whole study config checked (one-line ``ConfigError``), the shipped base included."""
    study = setups.validate_study(cfg, evaluation.EvaluationConfig, suite.AnalysisConfig)
    shipped_base(cfg)
    return study


def shipped_base(cfg) -> str | None:
    """The run directory of the study's shipped base (``cfg.base``), checked to be the run that
    ``cfg.pretrain`` describes; None when the study pretrains its own."""
    if not cfg.base:
        return None
    try:
        path = bases.path(cfg.base)
    except RunError as e:
        raise setups.ConfigError(f"config.base: {e}") from None
    diff = config_diff(RunDir.open(path, "config.base").config, cfg.pretrain.to_dict())
    if diff:
        raise setups.ConfigError(f"config.pretrain differs from the shipped base {cfg.base!r} ({', '.join(diff[:4])}); "
                                 "set --config.base='' to pretrain in the work directory")
    return path


def finished(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a training run that reached its last step."""
    return os.path.exists(os.path.join(run_dir, "config.json")) and RunDir.open(run_dir).finished()


def reproduce(cfg, workdir: str, *, distributed: bool = False, compilation_cache: bool = True,
              deadline: float | None = None) -> dict:
    """The whole study in ``workdir`` (see the module docstring); returns ``results.json``'s dict.
    With a ``deadline`` (``time.monotonic()``) the study runs in parts (:class:`Stages`): a part
    that stops early raises ``train.TimeBudgetReached`` and the same call continues the study."""
    study = validate(cfg)
    os.makedirs(workdir, exist_ok=True)
    if compilation_cache:
        enable_compilation_cache(os.path.join(workdir, ".jax_cache"))
    stage = Stages(workdir, deadline)
    t_start = time.perf_counter()
    pre_dir = shipped_base(cfg)
    if pre_dir is None:
        pre_dir = os.path.join(workdir, "pretrain")
        stage("pretrain", finished(pre_dir), lambda: pretrain(cfg.pretrain, pre_dir, distributed=distributed,
                                                              deadline=deadline), pausable=True)
    else:
        logging.info("== pretrain: the shipped base %s (%s)", cfg.base, pre_dir)
    ft_dirs = {m: os.path.join(workdir, m) for m in METHODS}
    for m in METHODS:
        stage(f"finetune/{m}", finished(ft_dirs[m]),
              lambda m=m: finetune(cfg.finetune[m], pre_dir, ft_dirs[m], distributed=distributed, deadline=deadline),
              pausable=True)
    for m in METHODS:
        stage(f"evaluate/{m}", stage_output_done(os.path.join(ft_dirs[m], "eval")),
              lambda m=m: evaluate(ft_dirs[m], study.evaluate))
    analysis_dir = os.path.join(workdir, "analysis")
    stage("analyze", stage_output_done(analysis_dir),
          lambda: analyze(pre_dir, [ft_dirs[m] for m in METHODS], analysis_dir, study.analyze))
    report_dir = os.path.join(workdir, "report")
    results = report.collect(pre_dir, ft_dirs, analysis_dir, stage.timings)
    os.makedirs(report_dir, exist_ok=True)
    for fig in results["analysis"].get("figures", {}).values():
        shutil.copy(os.path.join(analysis_dir, fig), os.path.join(report_dir, fig))
    report.write(report_dir, results, config=cfg.to_dict())
    logging.info("report: %s (this invocation %.0f s)", os.path.join(report_dir, "REPORT.md"),
                 time.perf_counter() - t_start)
    return results


__all__ = ["pretrain", "finetune", "evaluate", "analyze", "reproduce", "validate", "replicas"]

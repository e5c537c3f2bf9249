"""Evaluate every replica of a run on the evaluation sets and the soft-token attack (SPEC §9).

    python -m launch.evaluate --run runs/ssft [--sets safe,unsafe] [--n 1000] [--noattack] [--attack_n N] \\
        [--sweep_budget] [--sweep_k] [--attack_steps 50] [--name ssft_then_unlearn] [--ckpt_step N]

The run is a directory of ``launch.pretrain`` or ``launch.finetune`` (``config.json`` +
``checkpoints/``). Its latest checkpoint (or ``--ckpt_step``) is evaluated, every replica at once
(vmapped), on the first ``--n`` examples (default: the run's ``eval.n_final``) of each set, drawn
from the run's ``eval.seed`` exactly as training's final evaluation draws them; the attack
(``--attack``, default on; ``--noattack`` skips it) runs on the ``unsafe`` set's examples with
k = 2, budget 1 (the table's ``adversarial`` column), and optionally over budgets 0.25..4
(``--sweep_budget``: one compilation) and k = 1..8 (``--sweep_k``: one compilation per k).
Writes, in ``<run>/eval/``:

* ``metrics.json``: flat ``{key: number}``, keys ``<model>/<set>/<metric>`` with ``_lo`` / ``_hi``
  companions (95% interval) and ``<model>/<set>/n``; models are named
  ``<method>/lr=<lr>/seed=<seed>`` (``--name`` replaces the method, e.g. for cross-method runs);
  see ``safety_mech/evaluate.py`` for the metrics and the scheme;
* ``table.md``: the paper's table (``evaluate.paper_table``) and the sweeps;
* ``info.json``: what was evaluated (run, step, n, sets, models, attack config);
* ``adversarial.npz`` (with the attack): the attacked examples (``ev_<key>``: the unsafe set's
  arrays of the examples used, ``ev_index`` their positions), the kept soft tokens ``soft``
  [R, N, k, D] of every replica, ``step`` and ``k``; ``launch.analyze`` studies these inputs
  instead of attacking again (``attacks.adversarial_from_soft``).

One progress line per set and model. Bad input is a one-line error and a non-zero exit, with
nothing written. Runtime on the 2-core development VM (idle) for the ``tiny`` preset's fine-tuned
runs (2 replicas), n = 1000, as ``launch.reproduce`` runs it (session 3): 4-7 s per set, the attack
(k = 2, 50 steps) 17.5 s on 128 unsafe examples with compilation and ~10 s from the compilation
cache; a set's first evaluation adds ~5 s of compilation. The logic is
:func:`run`, importable from a notebook.

Flags are defined with ``allow_override`` because other launchers define flags of the same names
(``launch.sample --n``) and tests import them into one process.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from configs import pretrain as pretrain_config
from launch import common
from launch.common import RunError
from safety_mech import attacks
from safety_mech import checkpoint as ckpt_lib
from safety_mech import data as data_lib
from safety_mech import evaluate as eval_lib
from safety_mech import model as model_lib
from safety_mech import sharding as sharding_lib

_RUN = flags.DEFINE_string("run", None, "run directory to evaluate (config.json + checkpoints/)", allow_override=True)
_SETS = flags.DEFINE_list("sets", list(data_lib.EVAL_SETS), "evaluation sets (comma-separated)", allow_override=True)
_N = flags.DEFINE_integer("n", None, "examples per set (default: the run's eval.n_final)", allow_override=True)
_CHUNK = flags.DEFINE_integer("chunk", None, "examples per batch (default: the run's eval.batch_size)",
                              allow_override=True)
_ATTACK = flags.DEFINE_bool("attack", True, "run the soft-token attack (k=2, budget 1)", allow_override=True)
_ATTACK_N = flags.DEFINE_integer("attack_n", None, "unsafe examples attacked (default: --n)", allow_override=True)
_ATTACK_STEPS = flags.DEFINE_integer("attack_steps", attacks.AttackConfig.steps, "attack steps", allow_override=True)
_SWEEP_BUDGET = flags.DEFINE_bool("sweep_budget", False, f"attack success vs budget {attacks.BUDGETS}",
                                  allow_override=True)
_SWEEP_K = flags.DEFINE_bool("sweep_k", False, f"attack success vs k {attacks.KS}", allow_override=True)
_NAME = flags.DEFINE_string("name", None, "model name prefix (default: method.name, or 'pretrain')",
                            allow_override=True)
_CKPT_STEP = flags.DEFINE_integer("ckpt_step", None, "checkpoint step (default: the latest)", allow_override=True)

ADVERSARIAL_FILE = "adversarial.npz"
ATTACK_KEY = 1000  # fold_in(eval key, ATTACK_KEY): the attack's initial soft tokens (sets use 0..5)


def load_run(path: str, step: int | None = None):
    """``(setup, config, step)`` of run directory ``path``: its validated config (``configs.pretrain``
    groups), ``config.json`` and the checkpoint step to evaluate; one-line errors."""
    config = common.read_run_config(path, "--run")
    if not all(isinstance(config.get(g), dict) for g in pretrain_config.GROUPS):
        raise RunError(f"{os.path.join(path, 'config.json')} is not a run config (groups {pretrain_config.GROUPS})")
    setup = pretrain_config.validate(ml_collections.ConfigDict({g: config[g] for g in pretrain_config.GROUPS}))
    latest = ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(path))
    if latest is None:
        raise RunError(f"--run {path}: no checkpoint in {ckpt_lib.checkpoint_dir(path)}")
    return setup, config, latest if step is None else step


def load_replicas(path: str, step: int, model_cfg: model_lib.ModelConfig, n_replicas: int):
    """The run's params at ``step`` (stacked [R, ...] when ``n_replicas > 1``), checked leaf by leaf."""
    params = ckpt_lib.load_params(path, step)
    expected = jax.eval_shape(lambda k: model_lib.init_params(k, model_cfg), jax.random.key(0))
    lead = (n_replicas,) if n_replicas > 1 else ()
    if jax.tree.structure(params) != jax.tree.structure(expected):
        raise RunError(f"--run {path}: params at step {step} do not have the structure of its config's model")
    for (where, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected), strict=True):
        if tuple(got.shape) != lead + tuple(want.shape):
            raise RunError(f"--run {path}: params{jax.tree_util.keystr(where)} has shape {list(got.shape)}, "
                           f"expected {list(lead + tuple(want.shape))} ({n_replicas} replica(s))")
    return params


def _record(out: dict, names, prefix: str, summary: dict, counts: dict, seconds: float) -> None:
    """Add one set's (or attack's) summary and ``counts`` (``n``, ...) to ``out`` for every model
    and log a progress line each."""
    for r, name in enumerate(names):
        flat = eval_lib.flat_metrics(f"{name}/{prefix}", summary, r if len(names) > 1 else None)
        out.update(flat)
        out.update({f"{name}/{prefix}/{k}": v for k, v in counts.items()})
        shown = [f"{k.removeprefix('gen_')} {100 * flat[f'{name}/{prefix}/{k}']:.1f}%"
                 for k in ("gen_instruct", "gen_null", "gen_strict", "gen_lenient") if k in summary]
        if "tf_token_acc_true" in summary:
            shown.append(f"tf_acc {flat[f'{name}/{prefix}/tf_token_acc_true']:.3f}")
        cut = f", {counts['n_truncated']} with cut targets" if counts.get("n_truncated") else ""
        logging.info("%-22s %-34s %s (%d examples%s, %.1f s)", prefix, name, " ".join(shown), counts["n"], cut,
                     seconds)


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_npz(path: str, arrays: dict) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def run(run_dir: str, *, sets=data_lib.EVAL_SETS, n: int | None = None, chunk: int | None = None,
        attack: bool = True, attack_steps: int = attacks.AttackConfig.steps, sweep_budget: bool = False,
        sweep_k: bool = False, name: str | None = None, ckpt_step: int | None = None,
        attack_n: int | None = None) -> dict:
    """Evaluate ``run_dir`` (see the module docstring); returns the flat metrics written.
    ``attack_n``: unsafe examples attacked (default ``n``; the attack costs ~50 forward and backward
    passes per example, so a short pipeline attacks fewer than it evaluates)."""
    sets = tuple(sets)
    unknown = [s for s in sets if s not in data_lib.EVAL_SETS]
    if unknown:
        raise RunError(f"--sets: unknown set(s) {unknown}; choose from {', '.join(data_lib.EVAL_SETS)}")
    if not sets and not attack:
        raise RunError("nothing to evaluate: no --sets and --noattack")
    if name is not None and (not name or "/" in name):
        raise RunError(f"--name {name!r} must be non-empty without '/'")
    for flag, value in (("n", n), ("chunk", chunk), ("attack_steps", attack_steps), ("attack_n", attack_n)):
        if value is not None and value < 1:
            raise RunError(f"--{flag} must be >= 1, got {value}")
    setup, config, step = load_run(run_dir, ckpt_step)
    n = n or setup.eval.n_final
    attack_n = attack_n or n
    chunk = chunk or setup.eval.batch_size
    attack_cfg = attacks.AttackConfig(steps=attack_steps)
    R = setup.train.n_replicas
    method = name or config.get("method", {}).get("name", "pretrain")
    names = eval_lib.model_names(method, setup.opt.peak_lrs(R), setup.train.seed)
    mesh = sharding_lib.make_mesh()
    params = sharding_lib.put_replicated(load_replicas(run_dir, step, setup.model, R), mesh)
    key = jax.random.key(setup.eval.seed)
    logging.info("evaluating %s step %d: %d model(s) %s, n=%d", run_dir, step, R, names, n)

    unsafe = attack_key = None
    if attack:
        unsafe = eval_lib.sample_eval_data(key, setup.data, "unsafe", attack_n)
        attack_key = jax.random.fold_in(key, ATTACK_KEY)
        if not attacks.n_usable(setup.model, unsafe, attack_n, attack_cfg.k):
            raise RunError(f"the attack with k={attack_cfg.k} soft tokens leaves no example its targets: learned "
                           f"positions cover only {setup.model.seq_len}; use --noattack")

    out: dict = {}
    eval_set = eval_lib.make_set_eval(setup.model, n_replicas=R, mesh=mesh, chunk=chunk)
    for s in sets:
        t0 = time.perf_counter()
        per_example = eval_set(params, eval_lib.sample_eval_data(key, setup.data, s, n), n)
        summary = eval_lib.summarize(per_example, harmful=s in eval_lib.HARMFUL_SETS)
        _record(out, names, s, summary, {"n": n}, time.perf_counter() - t0)

    if attack:
        make = {"n_replicas": R, "mesh": mesh, "chunk": chunk}
        attack_eval = attacks.make_attack_eval(setup.model, attack_cfg, **make)
        t0 = time.perf_counter()
        per_example, counts = attack_eval(params, unsafe, attack_n, attack_key)
        _record(out, names, "adversarial", eval_lib.summarize(per_example), counts, time.perf_counter() - t0)
        attacked, _ = attacks.usable_examples(setup.model, unsafe, attack_n, attack_cfg.k)
        soft = per_example["soft"] if R > 1 else per_example["soft"][None]
        adversarial = {"soft": soft.astype(np.float32), "step": np.int64(step), "k": np.int64(attack_cfg.k),
                       **{f"ev_{k}": v for k, v in attacked.items()}}

        def reporter(axis):
            clock = {"t": time.perf_counter()}

            def report(value, summary, counts):
                _record(out, names, f"adversarial/{axis}={value:g}", summary, counts, time.perf_counter() - clock["t"])
                clock["t"] = time.perf_counter()

            return report

        if sweep_budget:
            attacks.success_vs_budget(attack_eval, params, unsafe, attack_n, attack_key, report=reporter("budget"))
        if sweep_k:
            attacks.success_vs_k(setup.model, params, unsafe, attack_n, attack_key, cfg=attack_cfg, report=reporter("k"),
                                 **make)

    eval_dir = os.path.join(run_dir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    info = {"run": os.path.abspath(run_dir), "step": step, "n": n, "attack_n": attack_n if attack else None,
            "sets": list(sets), "eval_seed": setup.eval.seed,
            "models": {m: r for r, m in enumerate(names)},
            "attack": dataclasses.asdict(attack_cfg) if attack else None}
    table = (f"# {method} ({os.path.abspath(run_dir)}, step {step})\n\n{eval_lib.paper_table(out)}\n"
             f"{eval_lib.TABLE_CAPTION}\n")
    for axis in ("budget", "k") if attack else ():
        sweep = eval_lib.sweep_table(out, axis)
        if sweep:
            table += f"\nSoft-token attack, strict success vs {axis}:\n\n{sweep}"
    if attack:  # the attacked inputs, for launch.analyze (which would otherwise attack again)
        _write_npz(os.path.join(eval_dir, ADVERSARIAL_FILE), adversarial)
    _write(os.path.join(eval_dir, "info.json"), json.dumps(info, indent=2) + "\n")
    _write(os.path.join(eval_dir, "table.md"), table)
    _write(os.path.join(eval_dir, "metrics.json"), json.dumps(out, indent=1, sort_keys=True) + "\n")
    logging.info("wrote %s/{metrics.json,table.md,info.json}", eval_dir)
    return out


def _main():
    if not _RUN.value:
        raise RunError("--run is required")
    run(_RUN.value, sets=_SETS.value, n=_N.value, chunk=_CHUNK.value, attack=_ATTACK.value,
        attack_steps=_ATTACK_STEPS.value, sweep_budget=_SWEEP_BUDGET.value, sweep_k=_SWEEP_K.value,
        name=_NAME.value, ckpt_step=_CKPT_STEP.value, attack_n=_ATTACK_N.value)


def main(argv):
    common.launch(argv, (), _main)  # --run is checked in _main: common.launch words one required flag oddly


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)

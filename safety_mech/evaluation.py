"""The evaluation stage (SPEC §9): every replica of a run on the evaluation sets and under the
soft-token attack, written to ``<run>/eval/``.

The run's latest checkpoint (or ``ckpt_step``) is evaluated, every replica at once, on the first
``n`` examples (default: the run's ``eval.n_final``) of each set, drawn from the run's ``eval.seed``
exactly as training's final evaluation draws them; the attack runs on the ``unsafe`` set's
examples with k = 2, budget 1 (the table's ``adversarial`` column), and optionally over budgets
0.25..4 (``sweep_budget``: one compilation) and k = 1..8 (``sweep_k``: one compilation per k).
Files, in ``<run>/eval/`` (each written atomically):

* ``metrics.json``: flat ``{key: number}``, keys ``<model>/<set>/<metric>`` with ``_lo`` / ``_hi``
  companions (95% interval) and ``<model>/<set>/n`` (``tables.py`` has the scheme);
* ``table.md``: the paper's table and the sweeps;
* ``info.json``: what was evaluated (run, step, n, sets, models, attack config);
* ``adversarial.npz`` (with the attack): the attacked examples (``ev_<key>``), the kept soft tokens
  ``soft`` [R, N, k, D] of every replica, ``step`` and ``k``; the analyses study these inputs instead
  of attacking again (``attacks.adversarial_from_soft``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import logging

from safety_mech import attacks, files, safety_data, tables
from safety_mech import metrics as metrics_lib
from safety_mech import sharding as sharding_lib
from safety_mech.runs import RunDir, RunError

ADVERSARIAL_FILE = "adversarial.npz"
ATTACK_KEY = 1000  # fold_in(eval key, ATTACK_KEY): the attack's initial soft tokens (sets use 0..5)


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """What the evaluation stage computes (``configs/evaluate.py``)."""

    sets: tuple = safety_data.EVAL_SETS  # evaluation sets (SPEC §9)
    n: int | None = None  # examples per set; None: the run's eval.n_final
    chunk: int | None = None  # examples per compiled call; None: the run's eval.batch_size
    attack: bool = True  # the soft-token attack (k=2, budget 1) on the unsafe set
    attack_n: int | None = None  # unsafe examples attacked; None: n
    sweep_n: int | None = None  # of those, how many the budget and k sweeps attack; None: attack_n
    attack_steps: int = attacks.AttackConfig.steps
    sweep_budget: bool = False  # attack success vs budget (attacks.BUDGETS)
    sweep_k: bool = False  # attack success vs k (attacks.KS)
    name: str | None = None  # model-name prefix; None: method.name ("pretrain" for a pretraining run)
    ckpt_step: int | None = None  # checkpoint step; None: the latest

    def __post_init__(self):
        object.__setattr__(self, "sets", tuple(self.sets))
        unknown = [s for s in self.sets if s not in safety_data.EVAL_SETS]
        if unknown:
            raise ValueError(f"sets: unknown {unknown}; choose from {', '.join(safety_data.EVAL_SETS)}")
        if not self.sets and not self.attack:
            raise ValueError("nothing to evaluate: no sets and attack=False")
        if self.name is not None and (not self.name or "/" in self.name):
            raise ValueError(f"name={self.name!r} must be non-empty without '/'")
        for field in ("n", "chunk", "attack_n", "sweep_n", "attack_steps"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"{field} must be >= 1, got {value}")


def _record(out: dict, names, prefix: str, summary: dict, counts: dict, seconds: float) -> None:
    """Add one set's (or attack's) summary and ``counts`` to ``out`` for every model; a progress
    line each."""
    for r, name in enumerate(names):
        flat = metrics_lib.flat_metrics(f"{name}/{prefix}", summary, r)
        out.update(flat)
        out.update({f"{name}/{prefix}/{k}": v for k, v in counts.items()})
        shown = [f"{k.removeprefix('gen_')} {100 * flat[f'{name}/{prefix}/{k}']:.1f}%"
                 for k in ("gen_instruct", "gen_null", "gen_strict", "gen_lenient") if k in summary]
        if "tf_token_acc_true" in summary:
            shown.append(f"tf_acc {flat[f'{name}/{prefix}/tf_token_acc_true']:.3f}")
        cut = f", {counts['n_truncated']} with cut targets" if counts.get("n_truncated") else ""
        logging.info("%-22s %-34s %s (%d examples%s, %.1f s)", prefix, name, " ".join(shown), counts["n"], cut, seconds)


def evaluate_run(run_dir: str, cfg: EvaluationConfig = EvaluationConfig()) -> dict:
    """Evaluate ``run_dir`` (see the module docstring); returns the flat metrics written."""
    run = RunDir.open(run_dir)
    setup = run.setup
    step = run.latest_step() if cfg.ckpt_step is None else cfg.ckpt_step
    n = cfg.n or setup.eval.n_final
    attack_n = cfg.attack_n or n
    sweep_n = min(cfg.sweep_n or attack_n, attack_n)
    chunk = cfg.chunk or setup.eval.batch_size
    attack_cfg = attacks.AttackConfig(steps=cfg.attack_steps)
    names = run.model_names(cfg.name)
    mesh = sharding_lib.make_mesh()
    params = sharding_lib.put_replicated(run.load_params(step), mesh)
    key = jax.random.key(setup.eval.seed)
    logging.info("evaluating %s step %d: %d model(s) %s, n=%d", run_dir, step, len(names), names, n)

    unsafe = attack_key = None
    if cfg.attack:
        unsafe = metrics_lib.sample_eval_data(key, setup.data, "unsafe", attack_n)
        attack_key = jax.random.fold_in(key, ATTACK_KEY)
        if not attacks.n_usable(setup.model, unsafe, attack_n, attack_cfg.k):
            raise RunError(f"the attack with k={attack_cfg.k} soft tokens leaves no example its targets: learned "
                           f"positions cover only {setup.model.seq_len}; set attack=False")

    out: dict = {}
    eval_set = metrics_lib.make_set_eval(setup.model, mesh=mesh, chunk=chunk)
    for s in cfg.sets:
        t0 = time.perf_counter()
        per_example = eval_set(params, metrics_lib.sample_eval_data(key, setup.data, s, n), n)
        summary = metrics_lib.summarize(per_example, harmful=s in metrics_lib.HARMFUL_SETS)
        _record(out, names, s, summary, {"n": n}, time.perf_counter() - t0)

    adversarial = None
    if cfg.attack:
        attack_eval = attacks.make_attack_eval(setup.model, attack_cfg, mesh=mesh, chunk=chunk)
        t0 = time.perf_counter()
        per_example, counts = attack_eval(params, unsafe, attack_n, attack_key)
        _record(out, names, "adversarial", metrics_lib.summarize(per_example), counts, time.perf_counter() - t0)
        attacked, _ = attacks.usable_examples(setup.model, unsafe, attack_n, attack_cfg.k)
        adversarial = {"soft": per_example["soft"].astype(np.float32), "step": np.int64(step),
                       "k": np.int64(attack_cfg.k), **{f"ev_{k}": v for k, v in attacked.items()}}

        def reporter(axis):
            clock = {"t": time.perf_counter()}

            def report(value, summary, counts):
                _record(out, names, f"adversarial/{axis}={value:g}", summary, counts, time.perf_counter() - clock["t"])
                clock["t"] = time.perf_counter()

            return report

        if cfg.sweep_budget:
            attacks.success_vs_budget(attack_eval, params, unsafe, sweep_n, attack_key, report=reporter("budget"))
        if cfg.sweep_k:
            attacks.success_vs_k(setup.model, params, unsafe, sweep_n, attack_key, cfg=attack_cfg,
                                 report=reporter("k"), mesh=mesh, chunk=chunk)

    eval_dir = os.path.join(run_dir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    info = {"run": os.path.abspath(run_dir), "step": step, "n": n, "attack_n": attack_n if cfg.attack else None,
            "sweep_n": sweep_n if cfg.attack and (cfg.sweep_budget or cfg.sweep_k) else None,
            "sets": list(cfg.sets), "eval_seed": setup.eval.seed, "models": {m: r for r, m in enumerate(names)},
            "attack": dataclasses.asdict(attack_cfg) if cfg.attack else None}
    method = cfg.name or run.method
    table = f"# {method} ({os.path.abspath(run_dir)}, step {step})\n\n{tables.paper_table(out)}\n{tables.TABLE_CAPTION}\n"
    for axis in ("budget", "k") if cfg.attack else ():
        sweep = tables.sweep_table(out, axis)
        if sweep:
            table += f"\nSoft-token attack, strict success vs {axis}:\n\n{sweep}"
    if adversarial is not None:
        files.write_npz(os.path.join(eval_dir, ADVERSARIAL_FILE), adversarial)
    files.write_text(os.path.join(eval_dir, "info.json"), json.dumps(info, indent=2) + "\n")
    files.write_text(os.path.join(eval_dir, "table.md"), table)
    files.write_json(os.path.join(eval_dir, "metrics.json"), out, sort_keys=True)
    files.write_manifest(eval_dir)  # last: marks the stage done (runs.stage_output_done)
    logging.info("wrote %s/{metrics.json,table.md,info.json}", eval_dir)
    return out

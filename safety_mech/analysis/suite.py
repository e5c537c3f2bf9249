"""The analysis stage (SPEC §10): every replica of fine-tuned runs against their pretrained base,
written to ``<out>/analysis.json`` with its figures.

The base is the pretraining run (θ_IT); the runs are fine-tuned run directories whose base chain
starts at it (cross-method runs included: ΔW is always against θ_IT). Every replica of a run is a
model, named ``<methods>/lr=<peak lr>/seed=<seed>`` (methods of the chain joined by ``>``, e.g.
``ssft>unlearn``; a run directory's name is appended as ``@name`` when two runs give the same
prefix). ``arithmetic=("A+B",)`` adds θ_IT + ΔW_A + ΔW_B (SPEC §8) as one more model.

For every model (``entries.py`` has the definitions): ``weights``, ``row_space``, ``tau``,
``lipschitz``, ``alpha_sweep``; for the base: ``tau`` and ``lipschitz``. A fine-tuned model whose
run was evaluated at the same step with the attack (``<run>/eval/adversarial.npz``) is studied on
exactly the inputs its evaluation attacked; otherwise it is attacked here. ``analysis.json`` holds
``meta``, ``models``, those sections and ``figures``; every number is a finite float or int. The
SPEC §11 verdicts are computed from it by ``findings.py``. Weight analyses are float64 NumPy on the
float32 checkpoints; activations come from the float32 model and are reduced in float64.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np
from absl import logging

from safety_mech import attacks, files, safety_data
from safety_mech.analysis import entries, figures, interventions
from safety_mech.runs import RunDir, RunError, config_diff

ALPHA_MODES = ("all", "mlp")
BASE_NAME = "base"
# Fields of DataConfig the evaluation sets read: every run must agree on them.
EVAL_DATA_FIELDS = ("min_len", "max_len", "T", "p_second_pair")


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """What the analysis stage computes (``configs/analyze.py``)."""

    n: int = 256  # examples per evaluation set
    n_heldout: int | None = None  # held-out safe / unsafe examples for the cluster means; None: n
    sets: tuple = safety_data.EVAL_SETS  # evaluation sets (safe and unsafe required)
    alphas: tuple = (0.0, 0.5, 1.0, 1.5, 2.0)  # α of the sweep θ_IT + α·ΔW
    alpha_modes: tuple = ALPHA_MODES  # sweep all weights and/or the MLP only
    seed: int = 0  # key of the analysed inputs
    energy: float = 0.9  # energy cut of the ranks and column spaces
    top: int = 8  # singular directions reported per matrix
    batch_size: int = 128  # examples per forward pass
    base_replica: int | None = None  # replica of the base run, if it has several
    arithmetic: tuple = ()  # "A+B": add the model θ_IT + ΔW_A + ΔW_B

    def __post_init__(self):
        for name in ("sets", "alphas", "alpha_modes", "arithmetic"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        if self.n < 2 or (self.n_heldout is not None and self.n_heldout < 2):
            raise ValueError(f"n and n_heldout must be >= 2, got {self.n} and {self.n_heldout}")
        if self.batch_size < 1 or self.top < 1:
            raise ValueError(f"batch_size and top must be >= 1, got {self.batch_size} and {self.top}")
        bad = [m for m in self.alpha_modes if m not in ALPHA_MODES]
        if bad or len(set(self.alpha_modes)) != len(self.alpha_modes):
            raise ValueError(f"alpha_modes {list(self.alpha_modes)}: use distinct values of {ALPHA_MODES}")
        if self.alpha_modes and not self.alphas:
            raise ValueError("alphas is empty")
        unknown = [s for s in self.sets if s not in safety_data.EVAL_SETS]
        if unknown or "safe" not in self.sets or "unsafe" not in self.sets or len(set(self.sets)) != len(self.sets):
            raise ValueError(f"sets {list(self.sets)}: distinct names of {safety_data.EVAL_SETS}, safe and unsafe included")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")


class Model(NamedTuple):
    name: str
    params: dict  # one replica, NumPy
    info: dict  # JSON-ready: run, step, replica, lr, seed, methods (or arithmetic)


def load_models(base: str, runs: Sequence[str], cfg: AnalysisConfig, log: Callable = logging.info):
    """Read and check ``base`` and ``runs``; returns ``(base_model, models, model_cfg, data_cfg,
    meta)``. One-line :class:`RunError` on bad input."""
    if not runs:
        raise RunError("--runs: give at least one fine-tuned run")
    real = [os.path.realpath(r) for r in runs]
    dup = sorted({r for r in runs if real.count(os.path.realpath(r)) > 1})
    if dup:
        raise RunError(f"--runs lists {dup[0]} more than once")
    base_run = RunDir.open(base, "--base")
    if base_run.fine_tuned:
        raise RunError(f"--base {base} is a fine-tuned run; give the pretraining run its chain starts from")
    model_cfg = base_run.setup.model
    R_base = base_run.n_replicas
    if R_base > 1 and cfg.base_replica is None:
        raise RunError(f"--base {base} has {R_base} replicas; pick one with base_replica")
    if cfg.base_replica is not None and not 0 <= cfg.base_replica < R_base:
        raise RunError(f"base_replica {cfg.base_replica} outside 0..{R_base - 1}")
    base_replica = 0 if cfg.base_replica is None else cfg.base_replica

    found, root_step, data_cfg = [], None, None
    for path in runs:
        run = RunDir.open(path, "--runs")
        methods, chain = run.chain()
        if not chain:
            raise RunError(f"{run.where} is not a fine-tuned run (its config.json has no 'base')")
        root = chain[0]
        if config_diff(root["config"], base_run.config):
            raise RunError(f"{run.where} was not fine-tuned from --base {base} (its chain starts at {root['path']})")
        if (root["replica"] or 0) != base_replica:
            raise RunError(f"{run.where} starts from replica {root['replica']} of the base, not {base_replica}")
        if root_step is not None and root["step"] != root_step:
            raise RunError(f"{run.where} starts from base step {root['step']}, another run from step {root_step}")
        root_step = root["step"]
        if os.path.realpath(root["path"]) != os.path.realpath(base):
            log("note: %s records its base as %s (same config as --base %s)", path, root["path"], base)
        setup = run.setup
        if setup.model != model_cfg:
            raise RunError(f"{run.where}: model {setup.model} differs from --base's {model_cfg}")
        if data_cfg is None:
            data_cfg = setup.data
        elif any(getattr(setup.data, f) != getattr(data_cfg, f) for f in EVAL_DATA_FIELDS):
            raise RunError(f"{run.where}: data config differs from the other runs' in one of {EVAL_DATA_FIELDS}")
        found.append((path, run, methods, setup, [{k: r[k] for k in ("path", "step", "replica")} for r in chain]))
    if (data_cfg.max_len + 7) - 1 + entries.POSITIONS > data_cfg.T:
        raise RunError(f"sequences of length T={data_cfg.T} cannot hold the window EOT..EOT+{entries.POSITIONS - 1} "
                       f"after a text of {data_cfg.max_len} letters")

    prefixes = [">".join(methods) for _, _, methods, _, _ in found]
    models, names = [], set()
    for (path, run, methods, setup, bases), prefix in zip(found, prefixes):
        if prefixes.count(prefix) > 1:
            prefix = f"{prefix}@{os.path.basename(os.path.normpath(path))}"
        step = run.latest_step()
        stacked = run.load_params(step)
        for r, name in enumerate(run.model_names(prefix)):
            if name in names:
                raise RunError(f"two --runs give the model name {name}; rename a run directory")
            names.add(name)
            lr, seed = float(setup.opt.lrs[r // len(setup.train.seeds)]), setup.train.seeds[r % len(setup.train.seeds)]
            log("loading %s (%s, step %d, replica %d)", name, path, step, r)
            models.append(Model(name, jax.tree.map(lambda x: np.asarray(x[r]), stacked), dict(
                run=os.path.abspath(path), step=step, replica=r, lr=lr, seed=seed, methods=list(methods),
                method=methods[-1], bases=bases)))
    log("loading the base %s (step %d)", base, root_step)
    base_params = base_run.replica_params(base_replica, root_step)
    base_model = Model(BASE_NAME, base_params, dict(run=os.path.abspath(base), step=root_step, replica=base_replica))

    by_name = {m.name: m for m in models}
    for spec in cfg.arithmetic:
        parts = spec.split("+")
        unknown = [p for p in parts if p not in by_name]
        if spec in by_name:
            raise RunError(f"arithmetic {spec} is given twice")
        if len(parts) < 2 or unknown:
            raise RunError(f"arithmetic {spec}: give model names joined by '+' (unknown: {unknown}; "
                           f"models: {sorted(by_name)})")
        params = interventions.delta_arithmetic(base_params, *(by_name[p].params for p in parts))
        models.append(Model(spec, params, dict(arithmetic=parts)))
        by_name[spec] = models[-1]
    meta = dict(base=dict(path=os.path.abspath(base), step=root_step, replica=base_replica),
                runs=[dict(path=os.path.abspath(p), step=run.latest_step(), n_replicas=run.n_replicas, methods=list(m))
                      for p, run, m, _, _ in found],
                model=dict(vars(model_cfg)), data={f: getattr(data_cfg, f) for f in EVAL_DATA_FIELDS})
    return base_model, models, model_cfg, data_cfg, meta


def make_figures(result: dict, out: str) -> dict:
    """The PNGs of §10 from the JSON numbers (``figures.analysis_figures``): ``tau`` (Fig. 3),
    ``null_space`` (Fig. 4), ``row_space`` (Fig. 5), ``lipschitz`` (Fig. 6), ``tau_attacks``
    (Fig. 7), ``alpha_sweep`` and ``tau_along_alpha`` (§10.6); returns {figure: file name}."""
    return figures.analysis_figures(result, out)


def analyze(base: str, runs: Sequence[str], out: str, cfg: AnalysisConfig = AnalysisConfig(),
            log: Callable = logging.info) -> dict:
    """Analyse ``runs`` against ``base`` and write ``out/analysis.json`` and the figures; returns the
    JSON dict (see the module docstring). Bad input is found before anything is written."""
    if not out:
        raise RunError("--out is empty")
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} exists and is not a directory")
    n_heldout = cfg.n if cfg.n_heldout is None else cfg.n_heldout
    base_model, models, model_cfg, data_cfg, meta = load_models(base, runs, cfg, log)
    bs = cfg.batch_size

    log("sampling %d examples of %s (+%d held-out safe/unsafe)", cfg.n, ", ".join(cfg.sets), n_heldout)
    eval_sets, heldout = entries.sample_inputs(data_cfg, cfg.seed, cfg.n, n_heldout, cfg.sets)
    metrics_fn = entries.make_safety_metrics(model_cfg, eval_sets["safe"], eval_sets["unsafe"], bs)
    tau_fn, at_zero = entries.sweep_tau_fn(model_cfg, eval_sets, heldout, bs), None
    attack_note = "attacks.adversarial_inputs on the unsafe set"

    result = dict(meta=dict(
        meta, n=cfg.n, n_heldout=n_heldout, seed=cfg.seed, energy=cfg.energy, top=cfg.top, alphas=list(cfg.alphas),
        alpha_modes=list(cfg.alpha_modes), sets=list(cfg.sets), positions=entries.POSITIONS, tau_site=entries.TAU_SITE,
        row_space_site="mlp_in (inputs of h_i/mlp/c_fc, the fine-tuned model's)", adversarial=attack_note,
        inputs="safety_data.sample_eval_set(fold_in(fold_in(key(seed), split), EVAL_SETS.index(set)), data, set, n); "
               "split 0: the evaluated sets (n), split 1: held-out safe/unsafe for the cluster means (n_heldout)"),
        models={BASE_NAME: base_model.info, **{m.name: m.info for m in models}},
        weights={}, row_space={}, tau={}, lipschitz={}, alpha_sweep={})
    sources = result["meta"]["adversarial_sources"] = {}
    log("[base] τ and Lipschitz")
    result["tau"][BASE_NAME] = entries.tau_entry(base_model.params, model_cfg, eval_sets, heldout, None, bs)
    result["lipschitz"][BASE_NAME] = entries.lipschitz_entry(base_model.params, model_cfg, eval_sets, None, bs)
    for i, m in enumerate(models, 1):
        tag = f"[{i}/{len(models)}] {m.name}"
        saved = entries.saved_adversarial(m.info, m.params, model_cfg)
        if saved is not None:
            got, sources[m.name] = saved
            log("%s: adversarial inputs from %s", tag, sources[m.name])
        else:
            log("%s: adversarial inputs (attacking)", tag)
            got = attacks.adversarial_inputs(m.params, model_cfg, eval_sets["unsafe"],
                                             jax.random.fold_in(jax.random.key(cfg.seed), 2))
            sources[m.name] = attack_note
        adv = entries.Adversarial(np.asarray(got["embeddings"], np.float32), np.asarray(got["prompt_len"], np.int32))
        log("%s: weights (§10.1-2)", tag)
        result["weights"][m.name] = entries.weight_entry(base_model.params, m.params, cfg.energy, cfg.top)
        log("%s: row space (§10.3)", tag)
        result["row_space"][m.name] = entries.row_space_entry(base_model.params, m.params, model_cfg, eval_sets, adv,
                                                              cfg.top, bs)
        log("%s: τ (§10.4)", tag)
        result["tau"][m.name] = entries.tau_entry(m.params, model_cfg, eval_sets, heldout, adv, bs)
        log("%s: Lipschitz (§10.5)", tag)
        result["lipschitz"][m.name] = entries.lipschitz_entry(m.params, model_cfg, eval_sets, adv, bs)
        log("%s: α sweep (§10.6)", tag)
        if at_zero is None and cfg.alpha_modes and 0.0 in cfg.alphas:
            log("  α sweep: α=0 (θ_IT, computed once for every model)")
            at_zero = (metrics_fn(base_model.params), tau_fn(base_model.params))
        result["alpha_sweep"][m.name] = entries.sweep_entry(base_model.params, m.params, model_cfg, cfg.alphas,
                                                            cfg.alpha_modes, metrics_fn, tau_fn, at_zero, log)
    bad: list = []
    result = files.sanitize(result, "", bad)
    result["meta"]["non_finite"] = bad
    os.makedirs(out, exist_ok=True)
    log("writing figures and %s", os.path.join(out, "analysis.json"))
    result["figures"] = make_figures(result, out)
    files.write_json(os.path.join(out, "analysis.json"), result)
    files.write_manifest(out)  # last: marks the stage done (runs.stage_output_done)
    return result

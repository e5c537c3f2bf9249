"""The analyses of SPEC §10 for fine-tuned runs against their pretrained base, and the §11 findings.

    python -m launch.analyze --base runs/pre --runs runs/ssft runs/dpo runs/unlearn --out runs/analysis \\
        [--n 256] [--alphas 0,0.5,1,1.5,2] [--alpha_modes all,mlp] [--seed 0] [--arithmetic A+B ...]

``--base`` is the pretraining run (θ_IT); ``--runs`` are ``launch.finetune`` run directories (also
``--runs=a,b,c``) whose base chain starts at it (cross-method runs included: ΔW is always against
θ_IT). Every replica of a run is a model, named ``<methods>/lr=<peak lr>/seed=<k>`` (methods of the
chain joined by ``>``, e.g. ``ssft>unlearn``; k counts the run's replicas with that lr; a run
directory's name is appended as ``@name`` when two runs give the same prefix). ``--arithmetic A+B``
adds θ_IT + ΔW_A + ΔW_B (SPEC §8) as one more model.

For every fine-tuned model (and, where it applies, the base, named ``base``):

* ``weights``: §10.1-10.2 for the MLP matrices of every layer (``analysis.weights.weight_analysis``),
  plus ``random_effective_rank`` / ``random_stable_rank``: those of a Gaussian matrix of the same
  shape (seeded), the baseline for "low rank";
* ``row_space``: §10.3 for the first MLP layer, a = the fine-tuned model's own MLP inputs at
  EOT..EOT+9 (true output teacher-forced), per set: means / stds over examples and positions;
* ``tau``: §10.4 τ per layer and set (MLP hidden units, EOT..EOT+9), cluster means of each model
  from a held-out split of safe / unsafe inputs;
* ``lipschitz``: §10.5 scores per set (``scores`` holds every example: the histograms);
* ``alpha_sweep``: §10.6, θ(α) for all weights (``all``) and/or the MLP only (``mlp``): greedy
  ``safe/instruct``, ``safe/null``, ``unsafe/null``, ``unsafe/attack_success`` and τ means per layer
  of the safe and unsafe sets along α.

Inputs: ``--n`` examples of each evaluation set (``data.EVAL_SETS``), drawn with
``data.sample_eval_set(fold_in(fold_in(key(seed), split), EVAL_SETS.index(set)), data_cfg, set, n)``,
split 0; the held-out split for the cluster means is split 1 (safe and unsafe, ``--n_heldout``).
Adversarial inputs (§9) are added as the set ``adversarial`` when ``safety_mech.attacks`` provides
``adversarial_inputs(params, model_cfg, batch, key) -> {"embeddings": [N, T, D], "prompt_len": [N]}``
(the unsafe batch with soft tokens, as input embeddings of the whole teacher-forced sequence; EOT at
``prompt_len - 1``); otherwise they are skipped and ``meta.adversarial`` says why. With the default
``adversarial_fn="auto"``, a fine-tuned model whose run was evaluated at the same step with the
attack (``<run>/eval/adversarial.npz`` of ``launch.evaluate``) is studied on exactly the inputs its
evaluation attacked (rebuilt from the saved soft tokens, no second attack);
``meta.adversarial_sources`` names the source of each model's inputs.

Writes ``<out>/analysis.json`` (top-level ``meta``, ``models``, ``weights``, ``row_space``, ``tau``,
``lipschitz``, ``alpha_sweep``, ``findings``, ``findings_unchecked``, ``figures``; every number is a
finite float or int) and the PNGs it names. ``findings`` holds, for each SPEC §11 finding these
numbers can test, ``{"held": "held" | "partly" | "not held", "numbers": ..., "rule": ...}`` computed
from the JSON numbers alone (:func:`findings`). Weight analyses are float64 NumPy on the float32
checkpoints; activations come from the float32 model and are reduced in float64.

Bad input (a missing run, a run not fine-tuned from ``--base``, mismatched models) is a one-line error
and a non-zero exit, found before anything is written; ``analysis.json`` is written last, atomically.
The logic is :func:`run`, importable from a notebook.

The flags live in this module's own ``FLAGS`` (absl flags are global, and ``--base``, ``--n``,
``--seed`` are already taken by ``launch.finetune`` / ``launch.sample``).
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from launch import common
from launch.common import RunError
from launch.finetune import BaseRun, find_base, load_base_params
from safety_mech import data as data_lib
from safety_mech import evaluate as eval_lib
from safety_mech import model as model_lib
from safety_mech import train as train_lib
from safety_mech.report import verdict
from safety_mech.analysis import activations, interventions, lipschitz, plots, weights

FLAGS = flags.FlagValues()
flags.DEFINE_string("base", None, "pretraining run directory (θ_IT)", flag_values=FLAGS)
flags.DEFINE_integer("base_replica", None, "replica of --base, if it has several", flag_values=FLAGS)
flags.DEFINE_list("runs", None, "fine-tuned run directories (--runs a b c or --runs=a,b,c)", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output directory (analysis.json and PNGs)", flag_values=FLAGS)
flags.DEFINE_integer("n", 256, "examples per evaluation set", lower_bound=2, flag_values=FLAGS)
flags.DEFINE_integer("n_heldout", None, "held-out safe/unsafe examples for the cluster means (default --n)",
                     lower_bound=2, flag_values=FLAGS)
flags.DEFINE_list("alphas", ["0", "0.5", "1", "1.5", "2"], "α values of the sweep", flag_values=FLAGS)
flags.DEFINE_list("alpha_modes", ["all", "mlp"], "sweep all weights and/or the MLP only", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the evaluation inputs", flag_values=FLAGS)
flags.DEFINE_float("energy", 0.9, "energy cut of the ranks and column spaces", flag_values=FLAGS)
flags.DEFINE_integer("top", 8, "singular directions reported per matrix", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 128, "examples per forward pass", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_multi_string("arithmetic", [], "A+B: add the model θ_IT + ΔW_A + ΔW_B", flag_values=FLAGS)
flags.DEFINE_list("sets", list(data_lib.EVAL_SETS), "evaluation sets (safe and unsafe are required)",
                  flag_values=FLAGS)

SETS = data_lib.EVAL_SETS
JAILBREAKS = tuple(s for s in SETS if s.startswith("jb_"))
ADVERSARIAL = "adversarial"
POSITIONS = 10  # EOT and the next 9 (SPEC §10.3-10.4)
TAU_SITE = "mlp_hidden"
ALPHA_MODES = ("all", "mlp")
BASE_NAME = "base"
SWEEP_METRICS = ("safe/instruct", "safe/null", "unsafe/null", "unsafe/attack_success")
# Thresholds of the findings' rules (stated in each finding's "rule").
SMALL_REL_NORM = 0.1
INSTRUCT_TOLERANCE = 0.05
# Keys of a run's config that may differ between the base run and the copy a fine-tuned run recorded.
_LOGGING_KEYS = set(common.RESUMABLE_CHANGES)


# ----------------------------------------------------------------------------------------------
# Runs and models
# ----------------------------------------------------------------------------------------------


class Model(NamedTuple):
    name: str
    params: dict  # one replica, NumPy
    info: dict  # JSON-ready: run, step, replica, lr, seed, methods (or arithmetic)


def _read_run(path: str, flag: str) -> BaseRun:
    """config.json + latest step of a run directory (``launch.finetune.find_base``), errors naming ``flag``."""
    try:
        return find_base(path, 0)  # replica 0 only passes find_base's replica check
    except RunError as e:
        raise RunError(str(e).replace("--base ", f"{flag} ", 1)) from None


def _setup(config: dict, where: str):
    """The validated config of a run (pretraining or fine-tuning) as its setup NamedTuple."""
    fine_tuned = "method" in config
    groups = finetune_config.GROUPS if fine_tuned else pretrain_config.GROUPS
    missing = [g for g in groups if not isinstance(config.get(g), dict)]
    if missing:
        raise RunError(f"{where}: config.json has no '{missing[0]}' group")
    cfg = ml_collections.ConfigDict({g: config[g] for g in groups})
    try:
        return (finetune_config if fine_tuned else pretrain_config).validate(cfg)
    except train_lib.ConfigError as e:
        raise RunError(f"{where}: config.json: {e}") from None


def _chain(config: dict, where: str):
    """(methods from the root's child down to this run, the ``base`` records from the root (the
    pretraining run) down to this run's own base)."""
    methods, node, records = [], config, []
    while isinstance(node, dict) and "base" in node:
        record = node["base"]
        if not (isinstance(record, dict) and {"path", "step", "replica", "config"} <= set(record)
                and isinstance(node.get("method"), dict)):
            raise RunError(f"{where}: config.json has a malformed 'base' record")
        methods.append(str(node["method"].get("name")))
        records.append(record)
        node = record["config"]
    if not records:
        raise RunError(f"{where} is not a fine-tuned run (its config.json has no 'base')")
    return tuple(reversed(methods)), records[::-1]


def _same_run_config(a: dict, b: dict) -> bool:
    """Equal configs up to logging / checkpoint cadence."""
    flat_a, flat_b = common._flatten(a), common._flatten(b)
    return all(flat_a.get(k) == flat_b.get(k) for k in set(flat_a) | set(flat_b) if k not in _LOGGING_KEYS)


def _load(run: BaseRun, replica, model_cfg, flag: str) -> dict:
    try:
        return load_base_params(run._replace(replica=replica), model_cfg)
    except RunError as e:
        raise RunError(str(e).replace("--base ", f"{flag} ", 1)) from None


# Fields of DataConfig the evaluation sets read: every run must agree on them.
_EVAL_DATA_FIELDS = ("min_len", "max_len", "T", "p_four_iid", "p_second_pair")


def load_models(base: str, runs: Sequence[str], base_replica: int | None = None, arithmetic: Sequence[str] = (),
                log: Callable = logging.info):
    """Read and check ``base`` and ``runs``; returns ``(base_model, models, model_cfg, data_cfg, meta)``.
    One-line :class:`RunError` on bad input."""
    if not runs:
        raise RunError("--runs: give at least one fine-tuned run")
    real = [os.path.realpath(r) for r in runs]
    dup = sorted({r for r in runs if real.count(os.path.realpath(r)) > 1})
    if dup:
        raise RunError(f"--runs lists {dup[0]} more than once")
    base_run = _read_run(base, "--base")
    if "base" in base_run.config:
        raise RunError(f"--base {base} is a fine-tuned run; give the pretraining run its chain starts from")
    base_setup = _setup(base_run.config, f"--base {base}")
    model_cfg = base_setup.model
    if base_run.n_replicas > 1 and base_replica is None:
        raise RunError(f"--base {base} has {base_run.n_replicas} replicas; pick one with --base_replica")
    if base_replica is not None and not 0 <= base_replica < base_run.n_replicas:
        raise RunError(f"--base_replica {base_replica} outside 0..{base_run.n_replicas - 1}")

    found, root_step, data_cfg = [], None, None
    for path in runs:
        where = f"--runs {path}"
        run = _read_run(path, "--runs")
        methods, chain = _chain(run.config, where)
        root = chain[0]
        if not _same_run_config(root["config"], base_run.config):
            raise RunError(f"{where} was not fine-tuned from --base {base} (its chain starts at {root['path']})")
        if base_run.n_replicas > 1 and root["replica"] != base_replica:
            raise RunError(f"{where} starts from replica {root['replica']} of the base, "
                           f"not --base_replica {base_replica}")
        if root_step is not None and root["step"] != root_step:
            raise RunError(f"{where} starts from base step {root['step']}, another run from step {root_step}")
        root_step = root["step"]
        if os.path.realpath(root["path"]) != os.path.realpath(base):
            log("note: %s records its base as %s (same config as --base %s)", path, root["path"], base)
        setup = _setup(run.config, where)
        if setup.model != model_cfg:
            raise RunError(f"{where}: model {setup.model} differs from --base's {model_cfg}")
        if data_cfg is None:
            data_cfg = setup.data
        elif any(getattr(setup.data, f) != getattr(data_cfg, f) for f in _EVAL_DATA_FIELDS):
            raise RunError(f"{where}: data config differs from the other runs' in one of {_EVAL_DATA_FIELDS}")
        found.append((path, run, methods, setup, [{k: r[k] for k in ("path", "step", "replica")} for r in chain]))
    if (data_cfg.max_len + 7) - 1 + POSITIONS > data_cfg.T:
        raise RunError(f"sequences of length T={data_cfg.T} cannot hold the window EOT..EOT+{POSITIONS - 1} "
                       f"after a text of {data_cfg.max_len} letters")

    prefixes = [">".join(methods) for _, _, methods, _, _ in found]
    models, names = [], set()
    for (path, run, methods, setup, bases), prefix in zip(found, prefixes):
        if prefixes.count(prefix) > 1:
            prefix = f"{prefix}@{os.path.basename(os.path.normpath(path))}"
        lrs = setup.opt.peak_lrs(setup.train.n_replicas)
        for r, lr in enumerate(lrs):
            name = f"{prefix}/lr={lr!r}/seed={lrs[:r].count(lr)}"
            if name in names:
                raise RunError(f"two --runs give the model name {name}; rename a run directory")
            names.add(name)
            log("loading %s (%s, step %d, replica %d)", name, path, run.step, r)
            params = _load(run, r if run.n_replicas > 1 else None, model_cfg, "--runs")
            models.append(Model(name, params, dict(
                run=os.path.abspath(path), step=run.step, replica=r, lr=lr, seed=lrs[:r].count(lr),
                train_seed=setup.train.seed, methods=list(methods), method=methods[-1], bases=bases)))
    log("loading the base %s (step %d)", base, root_step)
    base_params = _load(base_run._replace(step=root_step), base_replica if base_run.n_replicas > 1 else None,
                        model_cfg, "--base")
    base_model = Model(BASE_NAME, base_params, dict(run=os.path.abspath(base), step=root_step, replica=base_replica))

    by_name = {m.name: m for m in models}
    for spec in arithmetic:
        parts = spec.split("+")
        unknown = [p for p in parts if p not in by_name]
        if spec in by_name:
            raise RunError(f"--arithmetic {spec} is given twice")
        if len(parts) < 2 or unknown:
            raise RunError(f"--arithmetic {spec}: give model names joined by '+' (unknown: {unknown}; "
                           f"models: {sorted(by_name)})")
        params = interventions.delta_arithmetic(base_params, *(by_name[p].params for p in parts))
        models.append(Model(spec, params, dict(arithmetic=parts)))
        by_name[spec] = models[-1]
    meta = dict(base=dict(path=os.path.abspath(base), step=root_step, replica=base_replica),
                runs=[dict(path=os.path.abspath(p), step=run.step, n_replicas=run.n_replicas, methods=list(m))
                      for p, run, m, _, _ in found],
                model=dict(vars(model_cfg)), data={f: getattr(data_cfg, f) for f in _EVAL_DATA_FIELDS})
    return base_model, models, model_cfg, data_cfg, meta


# ----------------------------------------------------------------------------------------------
# Inputs and metrics
# ----------------------------------------------------------------------------------------------

# The fields of an evaluation batch kept (in _decoded_matches' argument order).
_KEEP = ("prompt", "prompt_len", "tokens_true", "gov_mask_true", "tokens_refusal", "gov_mask_refusal",
         "tokens_harmful", "gov_mask_harmful")


def sample_inputs(data_cfg: data_lib.DataConfig, seed: int, n: int, n_heldout: int, sets: Sequence[str] = SETS):
    """(evaluation split {set: batch}, held-out split {"safe", "unsafe": batch}) as NumPy dicts; see the
    module docstring for the keys."""
    key = jax.random.key(seed)

    def draw(split, name, m):
        k = jax.random.fold_in(jax.random.fold_in(key, split), SETS.index(name))
        batch = jax.device_get(data_lib.sample_eval_set(k, data_cfg, name, m))
        return {f: np.asarray(batch[f]) for f in _KEEP}

    return ({name: draw(0, name, n) for name in sets},
            {name: draw(1, name, n_heldout) for name in ("safe", "unsafe")})


@functools.partial(jax.jit, static_argnames="model_cfg")
def _decoded_matches(params, prompt, prompt_len, tokens_true, gov_true, tokens_refusal, gov_refusal,
                     tokens_harmful, gov_harmful, *, model_cfg):
    """[3, B] bool: greedy decoding gives the true output / the refusal / (not the refusal and) the
    harmful output on the governed segment: ``evaluate.generation_metrics``' Instruct, Null, strict."""
    ev = dict(prompt=prompt, prompt_len=prompt_len, tokens_true=tokens_true, gov_mask_true=gov_true,
              tokens_refusal=tokens_refusal, gov_mask_refusal=gov_refusal, tokens_harmful=tokens_harmful,
              gov_mask_harmful=gov_harmful)
    decoded = eval_lib.greedy_decode(params, model_cfg, prompt, prompt_len, eval_lib.last_governed(ev) + 1 - prompt_len)
    g = eval_lib.generation_metrics(decoded, ev)
    return jnp.stack([g["gen_instruct"], g["gen_null"], g["gen_strict"]])


def make_safety_metrics(model_cfg, safe: dict, unsafe: dict, batch_size: int = 128) -> Callable:
    """``metrics_fn(params) -> {name: float}`` (SPEC §9, greedy): ``safe/instruct`` (decoded = true
    output), ``safe/null`` and ``unsafe/null`` (decoded = refusal), ``unsafe/attack_success`` (not the
    refusal and = the harmful output, strict), with ``safety_mech.evaluate``'s definitions."""
    def rates(params, batch):
        fn = functools.partial(_decoded_matches, params, model_cfg=model_cfg)
        return _map_chunks(fn, [batch[f] for f in _KEEP], batch_size, out_axis=1).mean(1)

    def metrics_fn(params) -> dict:
        s, u = rates(params, safe), rates(params, unsafe)
        return {"safe/instruct": float(s[0]), "safe/null": float(s[1]), "unsafe/null": float(u[1]),
                "unsafe/attack_success": float(u[2])}

    return metrics_fn


def _map_chunks(fn, arrays, batch_size, out_axis=0):
    return activations.map_in_chunks(fn, [np.asarray(a) for a in arrays], batch_size, out_axis=out_axis)


# Adversarial inputs come as embeddings: this mirrors lipschitz.lipschitz_scores for an embeddings
# input (activation windows use activations.window(..., embedded=True)).
@functools.partial(jax.jit, static_argnames="model_cfg")
def _embedding_lipschitz(params, E_BxTxD, prompt_len_B, *, model_cfg):
    return lipschitz.max_logit_grad_norm(lambda E: model_lib.apply(params, model_cfg, embeddings=E),
                                         E_BxTxD, prompt_len_B - 1)


def adversarial_provider():
    """(``safety_mech.attacks.adversarial_inputs`` or None, a note saying which)."""
    try:
        from safety_mech import attacks  # noqa: PLC0415  (optional: another issue's module)
    except ImportError as e:
        return None, f"skipped: safety_mech.attacks not importable ({e})"
    fn = getattr(attacks, "adversarial_inputs", None)
    if fn is None:
        return None, "skipped: safety_mech.attacks has no adversarial_inputs"
    return fn, "safety_mech.attacks.adversarial_inputs on the unsafe set"


def saved_adversarial(info: dict, params, model_cfg) -> tuple[dict, str] | None:
    """The evaluation's attacked inputs of a fine-tuned model (``info``: a :class:`Model`'s), as
    ``adversarial_inputs`` returns them, and a note; None without a file of the model's step."""
    if "run" not in info or info.get("replica") is None:
        return None
    path = os.path.join(info["run"], "eval", "adversarial.npz")
    if not os.path.exists(path):
        return None
    from safety_mech import attacks  # noqa: PLC0415  (as adversarial_provider)
    with np.load(path) as f:
        saved = {k: f[k] for k in f.files}
    if int(saved["step"]) != info["step"] or info["replica"] >= saved["soft"].shape[0]:
        return None
    batch = {k: saved[f"ev_{k}"] for k in eval_lib.EVAL_KEYS}
    got = attacks.adversarial_from_soft(params, model_cfg, batch, saved["soft"][info["replica"]])
    return got, f"{path} (the evaluation's attack: {len(batch['prompt'])} unsafe examples, k={int(saved['k'])})"


class Adversarial(NamedTuple):
    E: np.ndarray  # [N, T, D] embeddings (float32)
    prompt_len: np.ndarray  # [N]

    def window(self, params, model_cfg, site, average, batch_size):
        T = int(self.prompt_len.max()) - 1 + POSITIONS
        fn = functools.partial(activations.window, params, model_cfg=model_cfg, site=site, positions=POSITIONS,
                               average=average, embedded=True)
        return _map_chunks(fn, [self.E[:, :T], self.prompt_len], batch_size, out_axis=1)

    def lipschitz(self, params, model_cfg, batch_size):
        T = int(self.prompt_len.max())
        fn = functools.partial(_embedding_lipschitz, params, model_cfg=model_cfg)
        return _map_chunks(fn, [self.E[:, :T], self.prompt_len], batch_size)


# ----------------------------------------------------------------------------------------------
# The analyses of one model
# ----------------------------------------------------------------------------------------------


def _summary(x) -> dict:
    x = np.asarray(x, np.float64)
    return dict(mean=float(x.mean()), std=float(x.std()))


@functools.lru_cache(maxsize=None)
def random_ranks(shape: tuple, energy: float, seed: int = 0) -> tuple:
    """(effective rank at ``energy``, stable rank) of a seeded Gaussian matrix of ``shape``: what
    "low rank" is measured against."""
    s = np.linalg.svd(np.random.default_rng(seed).standard_normal(shape), compute_uv=False)
    return weights.energy_rank(s, energy), float(np.sum(s ** 2) / s[0] ** 2)


def weight_entry(params_it, params_st, energy, top) -> dict:
    """§10.1-10.2 for the MLP matrices, with the Gaussian rank baselines."""
    result = weights.weight_analysis(params_it, params_st, energy=energy, top=top, pattern=r"/mlp/")
    for layer in result.values():
        for m in layer.values():
            m["random_effective_rank"], m["random_stable_rank"] = random_ranks(tuple(m["shape"]), energy)
    return result


def row_space_entry(params_it, params_st, model_cfg, eval_sets, adversarial, top, batch_size) -> dict:
    """§10.3 for the first MLP layer (c_fc), a = the fine-tuned model's MLP inputs at EOT..EOT+9."""
    it = weights.matrices_from_params(params_it, r"/mlp/c_fc$")
    st = weights.matrices_from_params(params_st, r"/mlp/c_fc$")
    inputs = {name: activations.collect_window(params_st, model_cfg, b["tokens_true"], b["prompt_len"],
                                               site="mlp_in", positions=POSITIONS, batch_size=batch_size)
              for name, b in eval_sets.items()}
    if adversarial is not None:
        inputs[ADVERSARIAL] = adversarial.window(params_st, model_cfg, "mlp_in", False, batch_size)
    svals, sets = [], {name: {} for name in inputs}
    for layer, name in enumerate(it):
        W_it = it[name].astype(np.float64)
        dW = st[name].astype(np.float64) - W_it
        for set_name, a_LxNxPxD in inputs.items():
            r = weights.row_space_stats(W_it, dW, a_LxNxPxD[layer], top)
            entry = sets[set_name]
            for key in ("delta_over_input", "delta_over_base"):
                s = _summary(r[key])
                entry.setdefault(f"{key}_mean", []).append(s["mean"])
                entry.setdefault(f"{key}_std", []).append(s["std"])
            entry.setdefault("delta_over_input_per_position", []).append(
                [float(v) for v in r["delta_over_input"].mean(0)])
            entry.setdefault("projections_abs_mean", []).append(
                [float(v) for v in np.abs(r["projections"]).mean((0, 1))])
        svals.append([float(v) for v in r["singular_values"]])
    return dict(matrix="mlp/c_fc", singular_values=svals, sets=sets)


def tau_entry(params, model_cfg, eval_sets, heldout, adversarial, batch_size) -> dict:
    extra = None
    if adversarial is not None:
        extra = {ADVERSARIAL: lambda p: adversarial.window(p, model_cfg, TAU_SITE, True, batch_size)}
    taus = interventions.set_taus(params, model_cfg, heldout["safe"], heldout["unsafe"], eval_sets,
                                  extra_acts=extra, site=TAU_SITE, positions=POSITIONS, batch_size=batch_size)
    return {name: activations.tau_summary(t) for name, t in taus.items()}


def lipschitz_entry(params, model_cfg, eval_sets, adversarial, batch_size) -> dict:
    scores = {name: lipschitz.lipschitz_scores(params, model_cfg, b["prompt"], b["prompt_len"], batch_size)
              for name, b in eval_sets.items()}
    if adversarial is not None:
        scores[ADVERSARIAL] = adversarial.lipschitz(params, model_cfg, batch_size)
    return {name: dict(**_summary(s), scores=[float(v) for v in s]) for name, s in scores.items()}


def sweep_tau_fn(model_cfg, eval_sets, heldout, batch_size) -> Callable:
    """τ means per layer of ``safe`` and ``unsafe`` along α (each θ(α) with its own cluster means)."""
    return interventions.make_tau_fn(model_cfg, heldout["safe"], heldout["unsafe"],
                                     {k: eval_sets[k] for k in ("safe", "unsafe")},
                                     site=TAU_SITE, positions=POSITIONS, batch_size=batch_size)


def sweep_entry(params_it, params_st, model_cfg, alphas, modes, metrics_fn, tau_fn, at_zero, log) -> dict:
    """§10.6 for one model; ``at_zero`` = (metrics_fn, tau_fn) of θ_IT, shared by every model and mode."""
    out = {}
    for mode in modes:
        sweep = interventions.alpha_sweep(params_it, params_st, alphas, metrics_fn, mlp_only=mode == "mlp",
                                          extra_fn=tau_fn, at_zero=at_zero,
                                          progress=lambda i, a: log("  α sweep (%s): α=%g", mode, a))
        out[mode] = dict(alpha=sweep["alpha"].tolist(),
                         metrics={k: v.tolist() for k, v in sweep["metrics"].items()},
                         tau_mean={k.split("/", 1)[1]: v.tolist() for k, v in sweep["extra"].items()})
    return out


# ----------------------------------------------------------------------------------------------
# SPEC §11 findings, from the JSON numbers alone
# ----------------------------------------------------------------------------------------------


def _separation(tau_model: dict, layer: int) -> float:
    """(mean τ_safe − mean τ_unsafe) / sqrt((std_safe² + std_unsafe²) / 2) at ``layer``."""
    s, u = tau_model["safe"], tau_model["unsafe"]
    pooled = math.sqrt((s["std"][layer] ** 2 + u["std"][layer] ** 2) / 2)
    return (s["mean"][layer] - u["mean"][layer]) / max(pooled, 1e-12)


def findings(result: dict) -> tuple[dict, dict]:
    """(``findings``, ``findings_unchecked``) of SPEC §11 from an analysis result (the JSON dict).
    Models made by ΔW arithmetic are left out (the findings are about fine-tuning)."""
    models = {k: v for k, v in result["models"].items() if k != BASE_NAME and "arithmetic" not in v}
    tau, found, unchecked = result["tau"], {}, {}
    n_layers = len(tau[BASE_NAME]["safe"]["mean"])
    deep = n_layers - 1

    def gain(m, layer):
        return _separation(tau[m], layer) - _separation(tau[BASE_NAME], layer)

    sep_rule = ("separation d = (mean τ_safe − mean τ_unsafe) / sqrt((std_safe² + std_unsafe²)/2), each "
                "model with its own held-out cluster means")
    nums = {m: {"base": _separation(tau[BASE_NAME], deep), "fine-tuned": _separation(tau[m], deep)} for m in models}
    found["tau_separates_after_finetuning"] = dict(
        held=verdict([v["fine-tuned"] > v["base"] for v in nums.values()]), numbers=nums,
        rule=f"{sep_rule}; at the deepest layer d(fine-tuned) > d(base), for every fine-tuned model")

    if n_layers >= 2:
        nums = {m: {"gain_first_layer": gain(m, 0), "gain_deepest_layer": gain(m, deep)} for m in models}
        found["tau_separation_grows_with_depth"] = dict(
            held=verdict([v["gain_deepest_layer"] > v["gain_first_layer"] for v in nums.values()]), numbers=nums,
            rule="gain = d(fine-tuned) − d(base) (d as in tau_separates_after_finetuning); gain at the deepest "
                 "layer > gain at layer 0, for every fine-tuned model")
    else:
        unchecked["tau_separation_grows_with_depth"] = "the model has one layer"

    by_run: dict = {}
    for m, info in models.items():
        by_run.setdefault(info["run"], []).append(m)
    nums = {}
    for run, names in by_run.items():
        lrs = sorted({models[m]["lr"] for m in names})
        if len(lrs) < 2:
            continue
        mean_gain = {lr: float(np.mean([gain(m, deep) for m in names if models[m]["lr"] == lr])) for lr in lrs}
        nums[run] = {"eta_M": lrs[-1], "eta_S": lrs[0], "gain_eta_M": mean_gain[lrs[-1]],
                     "gain_eta_S": mean_gain[lrs[0]]}
    if nums:
        found["tau_separation_larger_with_eta_M"] = dict(
            held=verdict([v["gain_eta_M"] > v["gain_eta_S"] for v in nums.values()]), numbers=nums,
            rule="per run: mean gain (deepest layer, over seeds) of the largest-lr replicas > that of the "
                 "smallest-lr replicas")
    else:
        unchecked["tau_separation_larger_with_eta_M"] = "no run has two learning rates"

    order = [meth for meth in ("ssft", "dpo", "unlearn")
             if any(info["methods"] == [meth] for info in models.values())]
    if len(order) >= 2:
        per_method = {}
        for meth in order:
            names = [m for m, info in models.items() if info["methods"] == [meth]]
            top_lr = max(models[m]["lr"] for m in names)
            per_method[meth] = float(np.mean([gain(m, deep) for m in names if models[m]["lr"] == top_lr]))
        found["tau_separation_ssft_lt_dpo_lt_unlearn"] = dict(
            held=verdict([per_method[a] < per_method[b] for a, b in zip(order, order[1:])]), numbers=per_method,
            rule="mean gain at the deepest layer of each method's largest-lr models (runs fine-tuned directly "
                 "from the base) increases in the order ssft < dpo < unlearn, for each consecutive pair present")
    else:
        unchecked["tau_separation_ssft_lt_dpo_lt_unlearn"] = "fewer than two of ssft, dpo, unlearn were given"

    w = result["weights"]
    mats = [(m, layer, name, mat) for m in models for layer, per in w[m].items() for name, mat in per.items()]
    nums = {m: max(mat["rel_norm"] for mm, _, _, mat in mats if mm == m) for m in models}
    found["delta_w_small"] = dict(
        held=verdict([v < SMALL_REL_NORM for v in nums.values()]), numbers={"max_rel_norm": nums},
        rule=f"max over MLP matrices of ‖ΔW‖_F/‖W_IT‖_F < {SMALL_REL_NORM}, for every fine-tuned model")
    nums = {f"{m} {layer}/{name}": [mat["effective_rank"], mat["random_effective_rank"]]
            for m, layer, name, mat in mats}
    found["delta_w_low_rank"] = dict(
        held=verdict([a < b for a, b in nums.values()]), numbers={"effective_rank_vs_gaussian": nums},
        rule="effective rank (energy cut) of ΔW < that of a Gaussian matrix of the same shape, for every MLP "
             "matrix of every fine-tuned model")
    nums = {f"{m} {layer}/{name}": dict(energy_fraction=mat["null_space"]["energy_fraction"],
                                        random_energy_fraction=mat["null_space"]["random_energy_fraction"],
                                        mean_score=float(np.mean(mat["null_space"]["scores"])),
                                        random_score=mat["null_space"]["random_score_expected"])
            for m, layer, name, mat in mats}
    found["delta_w_outside_col_w_it"] = dict(
        held=verdict([v["energy_fraction"] > v["random_energy_fraction"] and v["mean_score"] > v["random_score"]
                       for v in nums.values()]), numbers=nums,
        rule="‖(I−P)ΔW‖²/‖ΔW‖² > its random baseline 1 − k_IT/out and the mean s_i of ΔW's top directions > "
             "sqrt(1 − k_IT/out), for every MLP matrix of every fine-tuned model")

    rs = result["row_space"]
    nums = {m: {"safe": rs[m]["sets"]["safe"]["delta_over_input_mean"],
                "unsafe": rs[m]["sets"]["unsafe"]["delta_over_input_mean"]} for m in models}
    found["delta_w_acts_more_on_unsafe"] = dict(
        held=verdict([u > s for v in nums.values() for s, u in zip(v["safe"], v["unsafe"])]), numbers=nums,
        rule="mean ‖ΔW a‖/‖a‖ (first MLP layer, EOT..EOT+9) on unsafe > on safe inputs, per layer and model")

    lip = result["lipschitz"]
    nums = {m: {f"{s}_{who}": lip[k][s]["mean"] for s in ("safe", "unsafe") for who, k in (("base", BASE_NAME),
                                                                                            ("fine-tuned", m))}
            for m in models}
    found["lipschitz_falls_on_unsafe_rises_on_safe"] = dict(
        held=verdict([c for v in nums.values() for c in (v["unsafe_fine-tuned"] < v["unsafe_base"],
                                                          v["safe_fine-tuned"] > v["safe_base"])]), numbers=nums,
        rule="mean Lipschitz score: fine-tuned < base on unsafe inputs and fine-tuned > base on safe inputs "
             "(two checks per model)")

    attack_sets = [s for s in (*JAILBREAKS, ADVERSARIAL) if s in tau[next(iter(models))]]
    if attack_sets:
        nums = {m: {s: {"tau_mean": tau[m][s]["mean"][deep],
                        "midpoint": (tau[m]["safe"]["mean"][deep] + tau[m]["unsafe"]["mean"][deep]) / 2}
                    for s in attack_sets} for m in models}
        found["attack_activations_near_safe_cluster"] = dict(
            held=verdict([v["tau_mean"] > v["midpoint"] for per in nums.values() for v in per.values()]),
            numbers=nums,
            rule="at the deepest layer, mean τ of each jailbreak (and adversarial) set > the midpoint of the safe "
                 "and unsafe sets' mean τ, i.e. on the safe side, for every fine-tuned model")
    else:
        unchecked["attack_activations_near_safe_cluster"] = "no jailbreak or adversarial set was analysed"

    sweeps = result["alpha_sweep"]
    modes = result["meta"]["alpha_modes"]
    mode = "all" if "all" in modes else modes[0] if modes else None
    alphas = list(result["meta"]["alphas"]) if mode else []

    def safer(names, a, b):
        """Instruct (safe) and Null (unsafe) at α = a and b per model, and the two checks per model:
        Null rises from a to b, Instruct falls by at most INSTRUCT_TOLERANCE."""
        ia, ib = alphas.index(a), alphas.index(b)
        nums = {m: {k: [sweeps[m][mode]["metrics"][k][i] for i in (ia, ib)] for k in ("safe/instruct", "unsafe/null")}
                for m in names}
        checks = [c for v in nums.values() for c in (v["unsafe/null"][1] > v["unsafe/null"][0],
                                                     v["safe/instruct"][1] >= v["safe/instruct"][0] - INSTRUCT_TOLERANCE)]
        return nums, verdict(checks)

    if 0.0 in alphas and 1.0 in alphas:
        nums, held = safer(models, 0.0, 1.0)
        found["null_rises_instruct_kept"] = dict(
            held=held, numbers={"[alpha=0, alpha=1]": nums},
            rule=f"greedy Null on unsafe rises from α=0 (base) to α=1 (fine-tuned) and Instruct on safe falls by "
                 f"at most {INSTRUCT_TOLERANCE} (α sweep '{mode}', two checks per model)")
    else:
        unchecked["null_rises_instruct_kept"] = "the α sweep lacks α=0 or α=1"
    above = [a for a in alphas if a > 1.0]
    if 1.0 in alphas and above:
        ssft = [m for m, info in models.items() if info["methods"][-1] == "ssft"] or list(models)
        nums, held = safer(ssft, 1.0, max(above))
        found["alpha_above_1_safer"] = dict(
            held=held, numbers={f"[alpha=1, alpha={max(above):g}]": nums},
            rule=f"SSFT models (all models if none): Null on unsafe at the largest α > 1 exceeds α=1's and Instruct "
                 f"on safe falls by at most {INSTRUCT_TOLERANCE} (α sweep '{mode}', two checks per model)")
    else:
        unchecked["alpha_above_1_safer"] = "the α sweep lacks α=1 or an α > 1"
    for name in ("jailbreaks_succeed_more_than_unsafe", "ssft_most_susceptible"):
        unchecked[name] = "needs attack success on the jailbreak sets (launch.evaluate)"
    return found, unchecked


# ----------------------------------------------------------------------------------------------
# Figures, JSON, the run
# ----------------------------------------------------------------------------------------------


def make_figures(result: dict, out: str) -> dict:
    """The PNGs of §10 from the JSON numbers; returns {figure: file name}."""
    ft = [m for m in result["models"] if m != BASE_NAME]
    tau, w, lip = result["tau"], result["weights"], result["lipschitz"]
    figs = {}

    def save(name, fn, *args):
        figs[name] = os.path.basename(fn(*args, os.path.join(out, f"{name}.png")))

    save("tau", plots.plot_tau, tau)
    save("null_space", plots.plot_null_space_scores, {
        m: {f"{layer}/{name}": dict(scores=mat["null_space"]["scores"],
                                    baseline=mat["null_space"]["random_score_expected"])
            for layer, per in w[m].items() for name, mat in per.items()} for m in ft})
    save("row_space", plots.plot_row_space, {
        m: {s: v["delta_over_input_mean"] for s, v in result["row_space"][m]["sets"].items()} for m in ft})
    save("lipschitz", plots.plot_lipschitz, {
        f"{m} | {s}": {"W_IT": lip[BASE_NAME][s]["scores"], "W_ST": lip[m][s]["scores"]}
        for m in ft for s in ("safe", "unsafe")})
    sweeps = {f"{m} ({mode})": sw for m in ft for mode, sw in result["alpha_sweep"][m].items()}
    if sweeps:
        save("alpha_sweep", plots.plot_alpha_sweep, sweeps)
        save("tau_along_alpha", plots.plot_tau_along_alpha, sweeps)
    return figs


def _jsonable(x, path="", bad=None):
    """Plain JSON types; non-finite floats become None and are listed in ``bad``."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v, f"{path}/{k}", bad) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{path}[{i}]", bad) for i, v in enumerate(x)]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist(), path, bad)
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(float(x)):
            bad.append(path)
            return None
        return float(x)
    return x


def run(base: str, runs: Sequence[str], out: str, *, n: int = 256, n_heldout: int | None = None,
        alphas: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0), alpha_modes: Sequence[str] = ALPHA_MODES,
        seed: int = 0, energy: float = 0.9, top: int = 8, batch_size: int = 128, base_replica: int | None = None,
        arithmetic: Sequence[str] = (), sets: Sequence[str] = SETS, adversarial_fn: Callable | str = "auto",
        log: Callable = logging.info) -> dict:
    """Analyse ``runs`` against ``base`` and write ``out/analysis.json`` and the figures; returns the
    JSON dict (see the module docstring). ``adversarial_fn``: ``"auto"`` (``safety_mech.attacks``'s
    ``adversarial_inputs`` if there is one), ``"skip"``, or a function with that contract."""
    if not out:
        raise RunError("--out is empty")
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} exists and is not a directory")
    n_heldout = n if n_heldout is None else n_heldout
    if n < 2 or n_heldout < 2:
        raise RunError(f"--n and --n_heldout must be >= 2, got {n} and {n_heldout}")
    try:
        alphas = [float(a) for a in alphas]
    except ValueError as e:
        raise RunError(f"--alphas: {e}") from None
    bad_modes = [m for m in alpha_modes if m not in ALPHA_MODES]
    if bad_modes or len(set(alpha_modes)) != len(alpha_modes):
        raise RunError(f"--alpha_modes {list(alpha_modes)}: use distinct values of {ALPHA_MODES}")
    if alpha_modes and not alphas:
        raise RunError("--alphas is empty")
    sets = list(sets)
    unknown = [s for s in sets if s not in SETS]
    if unknown or "safe" not in sets or "unsafe" not in sets or len(set(sets)) != len(sets):
        raise RunError(f"--sets {sets}: distinct names of {SETS}, safe and unsafe included")
    if not 0.0 < energy <= 1.0:
        raise RunError(f"--energy must be in (0, 1], got {energy}")
    base_model, models, model_cfg, data_cfg, meta = load_models(base, runs, base_replica, arithmetic, log)

    log("sampling %d examples of %s (+%d held-out safe/unsafe)", n, ", ".join(sets), n_heldout)
    eval_sets, heldout = sample_inputs(data_cfg, seed, n, n_heldout, sets)
    if adversarial_fn == "auto":
        adv_fn, adv_note = adversarial_provider()
    elif adversarial_fn == "skip":
        adv_fn, adv_note = None, "skipped (adversarial_fn='skip')"
    else:
        adv_fn, adv_note = adversarial_fn, f"{getattr(adversarial_fn, '__name__', 'adversarial_fn')} on the unsafe set"
    log("adversarial inputs: %s", adv_note)
    metrics_fn = make_safety_metrics(model_cfg, eval_sets["safe"], eval_sets["unsafe"], batch_size)
    tau_fn, at_zero = sweep_tau_fn(model_cfg, eval_sets, heldout, batch_size), None

    result = dict(meta=dict(
        meta, n=n, n_heldout=n_heldout, seed=seed, energy=energy, top=top, alphas=alphas,
        alpha_modes=list(alpha_modes), sets=sets, positions=POSITIONS, tau_site=TAU_SITE,
        row_space_site="mlp_in (inputs of h_i/mlp/c_fc, the fine-tuned model's)", adversarial=adv_note,
        inputs="data.sample_eval_set(fold_in(fold_in(key(seed), split), EVAL_SETS.index(set)), data, set, n); "
               "split 0: the evaluated sets (n), split 1: held-out safe/unsafe for the cluster means (n_heldout)"),
        models={BASE_NAME: base_model.info, **{m.name: m.info for m in models}},
        weights={}, row_space={}, tau={}, lipschitz={}, alpha_sweep={})
    sources = result["meta"]["adversarial_sources"] = {}
    log("[base] τ and Lipschitz")
    result["tau"][BASE_NAME] = tau_entry(base_model.params, model_cfg, eval_sets, heldout, None, batch_size)
    result["lipschitz"][BASE_NAME] = lipschitz_entry(base_model.params, model_cfg, eval_sets, None, batch_size)
    for i, m in enumerate(models, 1):
        tag = f"[{i}/{len(models)}] {m.name}"
        adv = None
        if adv_fn is not None:
            saved = saved_adversarial(m.info, m.params, model_cfg) if adversarial_fn == "auto" else None
            if saved is not None:
                got, sources[m.name] = saved
                log("%s: adversarial inputs from %s", tag, sources[m.name])
            else:
                log("%s: adversarial inputs (attacking)", tag)
                got = adv_fn(m.params, model_cfg, eval_sets["unsafe"], jax.random.fold_in(jax.random.key(seed), 2))
                sources[m.name] = adv_note
            adv = Adversarial(np.asarray(got["embeddings"], np.float32), np.asarray(got["prompt_len"], np.int32))
            if adv.E.shape[1] < int(adv.prompt_len.max()) - 1 + POSITIONS:
                raise ValueError(f"adversarial_inputs gave {adv.E.shape[1]} positions; the window "
                                 f"EOT..EOT+{POSITIONS - 1} needs {int(adv.prompt_len.max()) - 1 + POSITIONS}")
        log("%s: weights (§10.1-2)", tag)
        result["weights"][m.name] = weight_entry(base_model.params, m.params, energy, top)
        log("%s: row space (§10.3)", tag)
        result["row_space"][m.name] = row_space_entry(base_model.params, m.params, model_cfg, eval_sets, adv, top,
                                                      batch_size)
        log("%s: τ (§10.4)", tag)
        result["tau"][m.name] = tau_entry(m.params, model_cfg, eval_sets, heldout, adv, batch_size)
        log("%s: Lipschitz (§10.5)", tag)
        result["lipschitz"][m.name] = lipschitz_entry(m.params, model_cfg, eval_sets, adv, batch_size)
        log("%s: α sweep (§10.6)", tag)
        if at_zero is None and alpha_modes and 0.0 in alphas:
            log("  α sweep: α=0 (θ_IT, computed once for every model)")
            at_zero = (metrics_fn(base_model.params), tau_fn(base_model.params))
        result["alpha_sweep"][m.name] = sweep_entry(base_model.params, m.params, model_cfg, alphas, alpha_modes,
                                                    metrics_fn, tau_fn, at_zero, log)
    bad: list = []
    result = _jsonable(result, "", bad)
    result["meta"]["non_finite"] = bad
    result["findings"], result["findings_unchecked"] = findings(result)
    for name, f in result["findings"].items():
        log("finding %s: %s", name, f["held"])

    os.makedirs(out, exist_ok=True)
    log("writing figures and %s", os.path.join(out, "analysis.json"))
    result["figures"] = make_figures(result, out)
    result = _jsonable(result, "", bad)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".analysis.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=1, allow_nan=False)
    os.replace(tmp, os.path.join(out, "analysis.json"))
    return result


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def parse_flags(argv):
    """This module's flags (one-line errors), then absl's own (logging etc.) via ``launch.common``;
    positional arguments are returned (more ``--runs``)."""
    if any(a in ("-h", "--help", "-?", "--helpshort") for a in argv[1:]):
        print(__doc__ + "\nflags:\n" + FLAGS.get_help())
        sys.exit(0)
    try:
        rest = FLAGS(argv, known_only=True)
    except flags.Error as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    flag_args = [a for a in rest[1:] if a.startswith("-")]
    positional = [a for a in rest[1:] if not a.startswith("-")]
    return common.parse_flags([rest[0], *flag_args]) + positional


def main(argv):
    missing = [f"--{name}" for name in ("base", "runs", "out") if not FLAGS[name].value]
    if missing:
        sys.exit(f"error: {', '.join(missing)} required (--base, --runs and --out)")
    runs = list(FLAGS.runs) + list(argv[1:])
    common.launch(argv[:1], (), lambda: run(
        FLAGS.base, runs, FLAGS.out, n=FLAGS.n, n_heldout=FLAGS.n_heldout, alphas=FLAGS.alphas,
        alpha_modes=FLAGS.alpha_modes, seed=FLAGS.seed, energy=FLAGS.energy, top=FLAGS.top,
        batch_size=FLAGS.batch_size, base_replica=FLAGS.base_replica, arithmetic=FLAGS.arithmetic,
        sets=FLAGS.sets))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

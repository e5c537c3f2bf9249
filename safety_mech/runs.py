"""A run directory: ``config.json``, ``metrics.jsonl``, ``checkpoints/`` and the stage outputs.

Layout (``runs/<name>/``)::

    config.json        the resolved config; a fine-tuned run adds ``base`` = {path, step, replica, config}
    metrics.jsonl      one JSON object per logged step; the last one ``"final": true``
    checkpoints/<step> orbax checkpoints of the training state (``checkpoint.py``), replicas stacked [R]
    eval/              ``evaluation.py``'s metrics.json, table.md, info.json, adversarial.npz

:class:`RunDir` is the one reader of these: it validates the config (``setups.py``), finds the
checkpoint to use, loads the params of every replica and checks them leaf by leaf against the model
the config describes; from a notebook it also gives the run's base, its evaluation sets and its
evaluation metrics. Every problem is a one-line :class:`RunError` naming the flag that pointed
here (``--run``, ``--base``, ...).
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from safety_mech import checkpoint as ckpt_lib
from safety_mech import files, replicas, setups
from safety_mech import metrics as metrics_lib
from safety_mech import model as model_lib
from safety_mech.files import MetricsLog


class RunError(RuntimeError):
    """A run directory (or base run) that cannot be used (one-line message)."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Keys that may differ between a run's config.json and the config resuming it (or a base run's copy
# recorded by a fine-tuned run): they change what is logged or saved, never the trajectory.
CADENCE_KEYS = ("train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_checkpoints")


def config_diff(a: dict, b: dict) -> list[str]:
    """Flattened keys where two configs differ, cadence keys (:data:`CADENCE_KEYS`) excepted; a key of
    ``setups.ADDED_KEYS`` absent from one config counts as its old value there."""
    fa, fb = _flatten(json.loads(json.dumps(a))), _flatten(json.loads(json.dumps(b)))  # tuples -> lists

    def value(flat, key):  # a key added to the configs later holds its old value where it is absent
        added = [v for k, v in setups.ADDED_KEYS.items() if key == k or key.endswith(f".{k}")]
        return flat.get(key, added[0] if added else None)
    return sorted(k for k in set(fa) | set(fb) if value(fa, k) != value(fb, k) and not k.endswith(CADENCE_KEYS))


@dataclasses.dataclass
class RunDir:
    """An existing run directory (see the module docstring)."""

    path: str
    config: dict
    flag: str = "--run"

    @classmethod
    def open(cls, path: str, flag: str = "--run") -> "RunDir":
        """Read ``path/config.json``; a missing or unreadable one is a :class:`RunError` naming ``flag``."""
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise RunError(f"{flag} {path}: no config.json (not a run directory)")
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise RunError(f"{flag} {path}: cannot read config.json: {' '.join(str(e).split())}") from None
        if not isinstance(config, dict):
            raise RunError(f"{flag} {path}: config.json is not a config (a JSON object)")
        return cls(os.path.abspath(path), config, flag)

    # -- what the run is ----------------------------------------------------------------------

    @property
    def fine_tuned(self) -> bool:
        return "base" in self.config

    @property
    def where(self) -> str:
        return f"{self.flag} {self.path}"

    @property
    def setup(self):
        """The validated config (``setups.PretrainSetup`` or ``setups.FinetuneSetup``)."""
        groups = setups.FINETUNE_GROUPS if self.fine_tuned else setups.PRETRAIN_GROUPS
        missing = [g for g in groups if not isinstance(self.config.get(g), dict)]
        if missing:
            raise RunError(f"{self.where}: config.json has no '{missing[0]}' group")
        cfg = ml_collections.ConfigDict({g: self.config[g] for g in groups})
        try:
            return setups.validate_finetune(cfg) if self.fine_tuned else setups.validate_pretrain(cfg)
        except setups.ConfigError as e:
            raise RunError(f"{self.where}: config.json: {e}") from None

    @property
    def method(self) -> str:
        """``method.name`` of a fine-tuned run, ``pretrain`` otherwise."""
        return self.config.get("method", {}).get("name", "pretrain") if self.fine_tuned else "pretrain"

    def chain(self) -> tuple[tuple[str, ...], list[dict]]:
        """(methods from the pretraining run's child down to this run, the ``base`` records from the
        root down to this run's own base); ``((), [])`` for a pretraining run."""
        methods, node, records = [], self.config, []
        while isinstance(node, dict) and "base" in node:
            record = node["base"]
            if not (isinstance(record, dict) and {"path", "step", "replica", "config"} <= set(record)
                    and isinstance(node.get("method"), dict)):
                raise RunError(f"{self.where}: config.json has a malformed 'base' record")
            methods.append(str(node["method"].get("name")))
            records.append(record)
            node = record["config"]
        return tuple(reversed(methods)), records[::-1]

    def model_names(self, method: str | None = None) -> list[str]:
        """Names of the run's replicas (``replicas.names``)."""
        s = self.setup
        return replicas.names(method or self.method, s.opt.lrs, s.train.seeds)

    @property
    def base(self) -> "RunDir":
        """The run this one was fine-tuned from (the path its ``config.json`` records)."""
        if not self.fine_tuned:
            raise RunError(f"{self.where} is a pretraining run: it has no base")
        return RunDir.open(self.config["base"]["path"], f"the base of {self.where}")

    def eval_set(self, name: str, n: int | None = None, keys=metrics_lib.EVAL_KEYS) -> dict:
        """The first ``n`` examples (default ``eval.n_final``) of evaluation set ``name`` as this
        run's evaluations draw them (from ``eval.seed``), host NumPy arrays (``keys`` of
        ``safety_data.sample_eval_set``)."""
        setup = self.setup
        n = setup.eval.n_final if n is None else n
        return metrics_lib.sample_eval_data(jax.random.key(setup.eval.seed), setup.data, name, n, keys)

    def eval_metrics(self) -> dict:
        """``eval/metrics.json`` of the evaluation stage: ``{<model>/<set>/<metric>: value}``."""
        path = os.path.join(self.path, "eval", "metrics.json")
        if not os.path.exists(path):
            raise RunError(f"{self.where} has no eval/metrics.json; run python -m launch.evaluate --run {self.path}")
        check_stage_output(os.path.dirname(path))
        with open(path) as f:
            return json.load(f)

    @property
    def n_replicas(self) -> int:
        s = self.setup
        return len(s.opt.lrs) * len(s.train.seeds)

    # -- files --------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> str:
        return ckpt_lib.checkpoint_dir(self.path)

    @property
    def metrics(self) -> MetricsLog:
        return MetricsLog(os.path.join(self.path, "metrics.jsonl"))

    def finished(self) -> bool:
        """Whether the metrics end with the final record of the configured last step."""
        final = self.metrics.final()
        return bool(final) and final.get("step") == self.setup.train.steps

    def latest_step(self) -> int:
        step = ckpt_lib.latest_step(self.checkpoint_dir)
        if step is None:
            raise RunError(f"{self.where}: no checkpoint in {self.checkpoint_dir}")
        return step

    def load_params(self, step: int | None = None):
        """The params of every replica at ``step`` (default: the latest), stacked [R, ...] as host
        numpy, checked leaf by leaf against the config's model and replica count."""
        step = self.latest_step() if step is None else step
        try:
            params = ckpt_lib.load_params(self.path, step)
        except ckpt_lib.CheckpointError as e:
            raise RunError(f"{self.where}: {e}") from None
        model_cfg = self.setup.model
        expected = jax.eval_shape(lambda k: model_lib.init_params(k, model_cfg), jax.random.key(0))
        if jax.tree.structure(params) != jax.tree.structure(expected):
            raise RunError(f"{self.where}: params at step {step} do not have the structure of its config's model "
                           f"({model_cfg})")
        lead = (self.n_replicas,)
        for (p, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected)):
            if tuple(got.shape) != lead + tuple(want.shape) or got.dtype != want.dtype:
                raise RunError(f"{self.where}: params{jax.tree_util.keystr(p)} is {got.dtype}{list(got.shape)}, "
                               f"expected {want.dtype}{list(lead + tuple(want.shape))} ({self.n_replicas} replica(s))")
            if not np.all(np.isfinite(got)):
                raise RunError(f"{self.where}: params{jax.tree_util.keystr(p)} at step {step} holds NaN or inf; "
                               "retrain the run (a lower learning rate) or use an earlier checkpoint")
        return params

    def replica_params(self, replica: int | None, step: int | None = None):
        """One replica's params (no replica axis); ``replica=None`` only for a one-replica run."""
        R = self.n_replicas
        if replica is None:
            if R > 1:
                raise RunError(f"{self.where} has {R} replicas; pick one (0..{R - 1})")
            replica = 0
        if not 0 <= replica < R:
            raise RunError(f"replica {replica} outside 0..{R - 1} ({self.where} has {R})")
        return replicas.select(self.load_params(step), replica)


def stage_output_done(directory: str) -> bool:
    """Whether a stage's output directory (``<run>/eval``, ``analysis/``) is complete: its
    ``SHA256SUMS``, written after every other file, matches them."""
    return files.check_manifest(directory) is None


def check_stage_output(directory: str) -> None:
    """Before reading a stage's output directory: a :class:`RunError` naming the problem when its
    files do not match their ``SHA256SUMS`` (a warning when it has none: written by an older version)."""
    problem = files.check_manifest(directory)
    if problem == f"no {files.MANIFEST}":
        logging.warning("%s has no %s: read unverified", directory, files.MANIFEST)
    elif problem:
        raise RunError(f"{directory} is corrupt or incomplete ({problem}); delete it and rerun its stage")


def check_new_or_same(workdir: str, config_dict: dict) -> bool:
    """Whether ``workdir`` holds a run of the same config to resume (True) or no run yet (False). A
    different config raises :class:`RunError` naming the keys."""
    path = os.path.join(workdir, "config.json")
    has_ckpt = ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(workdir)) is not None
    if not os.path.exists(path):
        if has_ckpt:
            raise RunError(f"{workdir} has checkpoints but no config.json; use a new --workdir")
        return False
    saved = RunDir.open(workdir, "--workdir").config
    diff = config_diff(saved, config_dict)
    if diff:
        raise RunError(f"{workdir} holds a run with a different config ({', '.join(diff)}); use a new --workdir")
    return has_ckpt

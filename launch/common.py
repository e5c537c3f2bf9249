"""What the training launchers (``launch.pretrain``, ``launch.finetune``) share: the flags
``--config``, ``--workdir``, ``--distributed`` (absl flags are global, so they are defined once,
here), one-line flag errors, the workdir check, and :func:`train_job`, the run itself (init, resume
or write ``config.json``, step, evaluator, train, close) given the launcher's pieces.
"""
from __future__ import annotations

import json
import logging as std_logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import flags, logging
from jax.sharding import Mesh
from ml_collections import config_flags

from safety_mech import checkpoint as ckpt_lib
from safety_mech import evaluate as eval_lib
from safety_mech import host_memory
from safety_mech import losses
from safety_mech import packing
from safety_mech import sharding as sharding_lib
from safety_mech import train as train_lib

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file and preset, e.g. configs/pretrain.py:tiny or configs/finetune.py:ssft:tiny",
    lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "run directory, e.g. runs/<name>")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")

# Keys that may differ when resuming: they change what is logged or saved, never the trajectory.
RESUMABLE_CHANGES = ("train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_checkpoints")


class RunError(RuntimeError):
    """A workdir (or base run) that cannot be used (one-line message)."""


# The errors a launcher reports as one line and a non-zero exit.
USER_ERRORS = (train_lib.ConfigError, RunError, ckpt_lib.CheckpointError, train_lib.NonFiniteLossError)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_workdir(workdir: str, config_dict: dict) -> bool:
    """Whether ``workdir`` holds a run of the same config (True: resume) or no run (False: start).
    A different config raises :class:`RunError` naming the keys."""
    path = os.path.join(workdir, "config.json")
    has_ckpt = ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(workdir)) is not None
    if not os.path.exists(path):
        if has_ckpt:
            raise RunError(f"{workdir} has checkpoints but no config.json; use a new --workdir")
        return False
    try:
        with open(path) as f:
            saved = _flatten(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    now = _flatten(json.loads(json.dumps(config_dict)))  # tuples -> lists, as in the file
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if diff:
        raise RunError(f"{workdir} holds a run with a different config ({', '.join(diff)}); use a new --workdir")
    return has_ckpt


def read_run_config(path: str, flag: str) -> dict:
    """The ``config.json`` of run directory ``path`` as a dict; a one-line :class:`RunError` naming
    ``flag`` (e.g. ``--base``) when it is missing or unreadable."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise RunError(f"{flag} {path}: no config.json (not a run directory)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"cannot read {config_path}: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise RunError(f"{config_path} is not a config (a JSON object)")
    return config


def make_run_mesh(batch_size: int, distributed: bool) -> Mesh:
    """Initialise jax.distributed (behind the flag), then the mesh over every device; a batch that
    does not split over it is a one-line ``ConfigError``."""
    sharding_lib.maybe_initialize_distributed(distributed)
    mesh = sharding_lib.make_mesh()
    try:
        sharding_lib.check_batch_size(batch_size, mesh)
    except ValueError as e:
        raise train_lib.ConfigError(f"config.train.batch_size: {e}") from None
    return mesh


def train_job(setup, workdir: str, config_dict: dict, resume: bool, init_params_fn: Callable,
              loss_fn: Callable, sample_fn: Callable, *, mesh: Mesh, ref_params: Any = None,
              tokens_per_example: int) -> dict:
    """Train ``setup`` (a validated config: ``data``, ``model``, ``opt``, ``train``, ``eval``,
    ``loss``) in ``workdir``, from its latest checkpoint if ``resume`` (see :func:`check_workdir`),
    else from ``init_params_fn(key)`` per replica after writing ``config_dict`` as ``config.json``.
    ``loss_fn`` and ``sample_fn(key, step)`` go to ``train.make_train_step``; ``ref_params`` (shared
    by the replicas, never saved) to every step. Returns the final metrics record."""
    tc, R = setup.train, setup.train.n_replicas
    optimizer = train_lib.make_optimizer(setup.opt)
    state = train_lib.init_replicas(jax.random.key(tc.seed), R, init_params_fn, optimizer, setup.opt.peak_lrs(R))
    state = sharding_lib.put_replicated(state, mesh)
    manager = ckpt_lib.make_checkpoint_manager(ckpt_lib.checkpoint_dir(workdir), max_to_keep=tc.keep_checkpoints)
    try:
        if resume:
            state = ckpt_lib.restore_state(manager, state)
            logging.info("resuming %s from step %d", workdir, train_lib.host_step(state))
        elif jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, "config.json"), "w") as f:
                json.dump(config_dict, f, indent=2, sort_keys=True)

        lr_fn = train_lib.make_lr_fn(setup.opt)
        pack = tc.pack
        if pack and jax.process_count() > 1:
            # the row plan is made on one host from the example lengths; several processes would
            # each need all of them: train unpacked (the same training up to float rounding)
            logging.warning("config.train.pack=True is not supported with several processes; training unpacked")
            pack = False
        if pack:
            if loss_fn is not losses.lm_loss:
                raise RunError("config.train.pack=True applies to pretraining (lm_loss) only")
            step_fn = packing.make_packed_train_step(optimizer, sample_fn, setup.loss, n_replicas=R, mesh=mesh,
                                                     lr_fn=lr_fn)
        else:
            step_fn = train_lib.make_train_step(loss_fn, optimizer, sample_fn, setup.loss, n_replicas=R, mesh=mesh,
                                                lr_fn=lr_fn, ref_in_axis=None)
        ec = setup.eval
        evaluator = eval_lib.make_instruct_eval(setup.model, setup.data, jax.random.key(ec.seed),
                                                max(ec.n_final, ec.n_periodic), sets=ec.sets,
                                                chunk=min(ec.batch_size, ec.n_periodic), n_replicas=R, mesh=mesh)
        logging.info("%d replica(s), peak lrs %s; %d devices", R, setup.opt.peak_lrs(R), mesh.size)
        _, final = train_lib.train(
            step_fn, state, n_steps=tc.steps, workdir=workdir, log_every=tc.log_every,
            eval_every=tc.eval_every, eval_fn=lambda p: evaluator(p, ec.n_periodic),
            final_eval_fn=lambda p: evaluator(p, ec.n_final),
            save_fn=lambda s: ckpt_lib.save_state(manager, s), ckpt_every=tc.ckpt_every,
            tokens_per_step=tokens_per_example * tc.batch_size * R, ref_params=ref_params)
    finally:
        manager.close()
    return final


def parse_flags(argv):
    """absl flag parsing with bad flags / config overrides reported in one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = str(e).strip()
        if "Traceback (most recent call last)" in text:  # an exception inside the config file
            sys.exit(f"error: --config: {text.splitlines()[-1]}")
        sys.exit(f"error: {' '.join(text.split())}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # config_flags: unknown key / bad override
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config.")) or "--config"
        sys.exit(f"error: cannot apply {overrides}: {type(e).__name__} {' '.join(str(e).split())}")


class QuietOrbax(std_logging.Filter):
    """Orbax logs every save step by step at INFO; keep its warnings only."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def launch(argv, required: Sequence[str], run_fn: Callable[[], Any]) -> None:
    """A launcher's ``main``: no positional arguments, the ``required`` flags set, then ``run_fn()``
    with its errors (:data:`USER_ERRORS`) as one line and a non-zero exit."""
    host_memory.keep_freed_memory()  # before the first computation: see safety_mech/host_memory.py
    logging.get_absl_handler().addFilter(QuietOrbax())
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if any(flags.FLAGS[name].value in (None, "") for name in required):
        names = [f"--{name}" for name in required]
        sys.exit(f"error: {names[0]} is required" if len(names) == 1 else
                 f"error: {', '.join(names[:-1])} and {names[-1]} are required")
    try:
        run_fn()
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")

"""Pretrain (instruction-tune) the model of SPEC §5.

    python -m launch.pretrain --config configs/pretrain.py:tiny --workdir runs/pretrain_tiny \\
        [--config.opt.lr=3e-3 ...] [--distributed]

Writes ``<workdir>/config.json``, ``metrics.jsonl`` and ``checkpoints/``; rerunning with the same
workdir resumes from the latest checkpoint (the config must match, except logging, evaluation and
checkpoint cadence). Bad input is a one-line error and a non-zero exit, with nothing overwritten.
The logic is :func:`run`, importable from a notebook.
"""
from __future__ import annotations

import json
import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from configs import pretrain as pretrain_config
from safety_mech import checkpoint as ckpt_lib
from safety_mech import data as data_lib
from safety_mech import evaluate as eval_lib
from safety_mech import losses
from safety_mech import model as model_lib
from safety_mech import sharding as sharding_lib
from safety_mech import train as train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/pretrain.py:<tiny|paper>", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory, e.g. runs/pretrain_tiny")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")

# Keys that may differ when resuming: they change what is logged or saved, never the trajectory.
RESUMABLE_CHANGES = ("train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_checkpoints")


class RunError(RuntimeError):
    """A workdir that cannot be used (one-line message)."""


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


def run(cfg, workdir: str, *, distributed: bool = False) -> dict:
    """Validate ``cfg``, then train (or resume) in ``workdir``; returns the final metrics record."""
    setup = pretrain_config.validate(cfg)
    config_dict = cfg.to_dict()
    resume = check_workdir(workdir, config_dict)
    sharding_lib.maybe_initialize_distributed(distributed)
    mesh = sharding_lib.make_mesh()
    try:
        sharding_lib.check_batch_size(setup.train.batch_size, mesh)
    except ValueError as e:
        raise train_lib.ConfigError(f"config.train.batch_size: {e}") from None

    tc, R = setup.train, setup.train.n_replicas
    optimizer = train_lib.make_optimizer(setup.opt)
    state = train_lib.init_replicas(jax.random.key(tc.seed), R,
                                    lambda k: model_lib.init_params(k, setup.model), optimizer,
                                    setup.opt.peak_lrs(R))
    state = sharding_lib.put_replicated(state, mesh)
    manager = ckpt_lib.make_checkpoint_manager(ckpt_lib.checkpoint_dir(workdir), max_to_keep=tc.keep_checkpoints)
    if resume:
        state = ckpt_lib.restore_state(manager, state)
        logging.info("resuming %s from step %d", workdir, train_lib.host_step(state))
    elif jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_dict, f, indent=2, sort_keys=True)

    step_fn = train_lib.make_train_step(
        losses.lm_loss, optimizer,
        lambda key, step: data_lib.sample_pretrain_batch(key, setup.data, tc.batch_size, step),
        setup.loss, n_replicas=R, mesh=mesh, lr_fn=train_lib.make_lr_fn(setup.opt))
    ec = setup.eval
    evaluator = eval_lib.make_instruct_eval(setup.model, setup.data, jax.random.key(ec.seed),
                                            max(ec.n_final, ec.n_periodic), sets=ec.sets,
                                            chunk=min(ec.batch_size, ec.n_periodic), n_replicas=R, mesh=mesh)
    n_params = model_lib.count_params(train_lib.select_replica(state.params, 0) if R > 1 else state.params,
                                      exclude_head=False)
    logging.info("model %s: %d parameters; %d replica(s); %d devices", setup.model, n_params, R, mesh.size)
    _, final = train_lib.train(
        step_fn, state, n_steps=tc.steps, workdir=workdir, log_every=tc.log_every,
        eval_every=tc.eval_every, eval_fn=lambda p: evaluator(p, ec.n_periodic),
        final_eval_fn=lambda p: evaluator(p, ec.n_final),
        save_fn=lambda s: ckpt_lib.save_state(manager, s), ckpt_every=tc.ckpt_every,
        tokens_per_step=tc.batch_size * setup.data.T * R)
    manager.close()
    return final


def _parse_flags(argv):
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


class _QuietOrbax(std_logging.Filter):
    """Orbax logs every save step by step at INFO; keep its warnings only."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv):
    logging.get_absl_handler().addFilter(_QuietOrbax())
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        sys.exit("error: --config and --workdir are required")
    try:
        run(_CONFIG.value, _WORKDIR.value, distributed=_DISTRIBUTED.value)
    except (train_lib.ConfigError, RunError, ckpt_lib.CheckpointError, train_lib.NonFiniteLossError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)

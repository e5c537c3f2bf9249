"""Safety fine-tuning (SPEC §8) of a base run: SSFT, DPO or unlearning.

    python -m launch.finetune --config configs/finetune.py:ssft:tiny --base runs/pretrain_tiny \\
        --workdir runs/ssft_tiny [--base_replica N] [--config.method.beta=0.1 ...] [--distributed]

The base is a run directory (``config.json`` + ``checkpoints/``): a pretraining run, or a fine-tuned
run (cross-method fine-tuning; ``--base_replica N`` picks one of its replicas). Its latest params
initialise every replica (fresh optimizer state) and, for DPO, are the frozen reference, shared by
the replicas and never saved with the run. The run's ``config.json`` holds the resolved config (model
and data lengths from the base) and ``base`` = {path, step, replica, config}. Rerunning with the same
workdir, config and base resumes from the latest checkpoint. Bad input is a one-line error and a
non-zero exit, with nothing written. The logic is :func:`run`, importable from a notebook.

The flags ``--config``, ``--workdir`` and ``--distributed`` are those of ``launch.pretrain`` (absl
flags are global; both launchers are imported together by the tests and notebooks).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, NamedTuple

import jax
from absl import app, flags, logging

from configs import finetune as finetune_config
from launch import pretrain as launch_pretrain
from safety_mech import checkpoint as ckpt_lib
from safety_mech import data as data_lib
from safety_mech import evaluate as eval_lib
from safety_mech import finetune_losses
from safety_mech import model as model_lib
from safety_mech import sharding as sharding_lib
from safety_mech import train as train_lib

_BASE = flags.DEFINE_string("base", None, "base run directory (pretraining or fine-tuning run)")
_BASE_REPLICA = flags.DEFINE_integer("base_replica", None, "replica of the base run to start from "
                                     "(required when the base run has several)")

RunError = launch_pretrain.RunError


class BaseRun(NamedTuple):
    """What the fine-tuned run starts from (params are loaded separately, after distributed init)."""

    path: str  # absolute
    step: int
    replica: int | None  # None: the base run has one replica
    n_replicas: int
    config: dict  # the base run's config.json

    def record(self) -> dict:
        """The ``base`` entry of the fine-tuned run's config.json."""
        return {"path": self.path, "step": self.step, "replica": self.replica, "config": self.config}


def find_base(path: str, replica: int | None = None) -> BaseRun:
    """Read the base run's config.json and latest checkpoint step, check ``replica``; one-line
    :class:`RunError` on bad input. Touches no accelerator."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise RunError(f"--base {path}: no config.json (not a run directory)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"cannot read {config_path}: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise RunError(f"{config_path} is not a config (a JSON object)")
    step = ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(path))
    if step is None:
        raise RunError(f"--base {path}: no checkpoint in {ckpt_lib.checkpoint_dir(path)}")
    n_replicas = int(config.get("train", {}).get("n_replicas", 1))
    if n_replicas > 1 and replica is None:
        raise RunError(f"--base {path} has {n_replicas} replicas; pick one with --base_replica 0..{n_replicas - 1}")
    if replica is not None and not 0 <= replica < n_replicas:
        raise RunError(f"--base_replica {replica} outside 0..{n_replicas - 1} (--base {path} has {n_replicas})")
    return BaseRun(os.path.abspath(path), step, replica if n_replicas > 1 else None, n_replicas, config)


def load_base_params(base: BaseRun, model_cfg: model_lib.ModelConfig):
    """The base params (one replica) at ``base.step``, checked against ``model_cfg`` leaf by leaf."""
    params = ckpt_lib.load_params(base.path, base.step)
    if base.replica is not None:
        params = train_lib.select_replica(params, base.replica)
    expected = jax.eval_shape(lambda k: model_lib.init_params(k, model_cfg), jax.random.key(0))
    if jax.tree.structure(params) != jax.tree.structure(expected):
        raise RunError(f"--base {base.path}: params at step {base.step} do not have the structure of "
                       f"its config's model ({model_cfg})")
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected)):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise RunError(f"--base {base.path}: params{jax.tree_util.keystr(path)} is {got.dtype}{list(got.shape)}, "
                           f"its config's model wants {want.dtype}{list(want.shape)}")
    return params


def run(cfg, base: str, workdir: str, *, base_replica: int | None = None, distributed: bool = False) -> dict:
    """Fine-tune the base run ``base`` with ``cfg`` (a ``configs/finetune.py`` config) in ``workdir``
    (or resume); returns the final metrics record."""
    if os.path.realpath(base) == os.path.realpath(workdir):
        raise RunError("--base and --workdir are the same directory")
    base_run = find_base(base, base_replica)
    resolved = finetune_config.inherit_from_base(cfg, base_run.config, f"--base {base}")
    setup = finetune_config.validate(resolved)
    config_dict = {**resolved.to_dict(), "base": base_run.record()}
    resume = launch_pretrain.check_workdir(workdir, config_dict)
    sharding_lib.maybe_initialize_distributed(distributed)
    mesh = sharding_lib.make_mesh()
    try:
        sharding_lib.check_batch_size(setup.train.batch_size, mesh)
    except ValueError as e:
        raise train_lib.ConfigError(f"config.train.batch_size: {e}") from None
    base_params = sharding_lib.put_replicated(load_base_params(base_run, setup.model), mesh)

    tc, R, method = setup.train, setup.train.n_replicas, setup.method
    optimizer = train_lib.make_optimizer(setup.opt)
    state = train_lib.init_replicas(jax.random.key(tc.seed), R, lambda k: base_params, optimizer,
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
        finetune_losses.LOSSES[method.name], optimizer,
        lambda key, step: data_lib.sample_finetune_batch(key, setup.data, tc.batch_size),
        setup.loss, n_replicas=R, mesh=mesh, lr_fn=train_lib.make_lr_fn(setup.opt), ref_in_axis=None)
    ec = setup.eval
    evaluator = eval_lib.make_instruct_eval(setup.model, setup.data, jax.random.key(ec.seed),
                                            max(ec.n_final, ec.n_periodic), sets=ec.sets,
                                            chunk=min(ec.batch_size, ec.n_periodic), n_replicas=R, mesh=mesh)
    logging.info("%s fine-tuning from %s (step %d, replica %s); %d replica(s), lrs %s; %d devices", method.name,
                 base_run.path, base_run.step, base_run.replica, R, setup.opt.peak_lrs(R), mesh.size)
    ref_params: Any = base_params if method.name == "dpo" else None  # the frozen reference: never in the state
    _, final = train_lib.train(
        step_fn, state, n_steps=tc.steps, workdir=workdir, log_every=tc.log_every,
        eval_every=tc.eval_every, eval_fn=lambda p: evaluator(p, ec.n_periodic),
        final_eval_fn=lambda p: evaluator(p, ec.n_final),
        save_fn=lambda s: ckpt_lib.save_state(manager, s), ckpt_every=tc.ckpt_every,
        # both completions of every example go through the model
        tokens_per_step=2 * tc.batch_size * setup.data.T * R, ref_params=ref_params)
    manager.close()
    return final


def main(argv):
    logging.get_absl_handler().addFilter(launch_pretrain._QuietOrbax())
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    if FLAGS.config is None or not FLAGS.workdir or not _BASE.value:
        sys.exit("error: --config, --base and --workdir are required")
    try:
        run(FLAGS.config, _BASE.value, FLAGS.workdir, base_replica=_BASE_REPLICA.value,
            distributed=FLAGS.distributed)
    except (train_lib.ConfigError, RunError, ckpt_lib.CheckpointError, train_lib.NonFiniteLossError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=launch_pretrain._parse_flags)

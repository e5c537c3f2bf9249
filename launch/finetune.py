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

The flags ``--config``, ``--workdir`` and ``--distributed`` are ``launch.common``'s, shared with
``launch.pretrain`` (absl flags are global; both launchers are imported together by the tests).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import jax
from absl import app, flags, logging

from configs import finetune as finetune_config
from launch import common
from launch.common import RunError
from safety_mech import checkpoint as ckpt_lib
from safety_mech import data as data_lib
from safety_mech import finetune_losses
from safety_mech import model as model_lib
from safety_mech import sharding as sharding_lib
from safety_mech import train as train_lib

_BASE = flags.DEFINE_string("base", None, "base run directory (pretraining or fine-tuning run)")
_BASE_REPLICA = flags.DEFINE_integer("base_replica", None, "replica of the base run to start from "
                                     "(required when the base run has several)")

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
    config = common.read_run_config(path, "--base")
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
    resume = common.check_workdir(workdir, config_dict)
    mesh = common.make_run_mesh(setup.train.batch_size, distributed)
    base_params = sharding_lib.put_replicated(load_base_params(base_run, setup.model), mesh)
    method, batch_size = setup.method.name, setup.train.batch_size
    logging.info("%s fine-tuning from %s (step %d, replica %s)", method, base_run.path, base_run.step,
                 base_run.replica)
    return common.train_job(
        setup, workdir, config_dict, resume, lambda k: base_params, finetune_losses.LOSSES[method],
        lambda key, step: data_lib.sample_finetune_batch(key, setup.data, batch_size), mesh=mesh,
        ref_params=base_params if method == "dpo" else None,  # the frozen reference: never in the state
        tokens_per_example=2 * setup.data.T)  # both completions of every example go through the model


def main(argv):
    common.launch(argv, ("config", "base", "workdir"), lambda: run(
        common.CONFIG.value, _BASE.value, common.WORKDIR.value, base_replica=_BASE_REPLICA.value,
        distributed=common.DISTRIBUTED.value))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)

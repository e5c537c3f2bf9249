"""Checkpoints with orbax ``CheckpointManager`` and ``ocp.args``: save every N steps and at the end,
resume from the latest.

A checkpoint of a training state (any NamedTuple with ``step``, ``params`` and more fields, e.g.
``train.TrainState``) holds two items:

* ``params``: the parameters as a plain nested dict, loadable without a template
  (:func:`load_params`; fine-tuning, evaluation and analysis read only this);
* ``state``: every other field (step, optimizer state, data key), restored into a template.

Run directory layout: ``runs/<name>/{config.json, metrics.jsonl, checkpoints/<step>/...}``. Saves are
synchronous: the training step donates its input buffers, so nothing may still be reading them once
``save_state`` returns. Any failure to read a checkpoint is one line: :class:`CheckpointError`.

Integrity: after orbax commits a step, its directory gets a ``SHA256SUMS`` of every file
(``files.write_manifest``). :func:`load_params` verifies it before reading and refuses a corrupt
checkpoint naming the file; :func:`restore_state` (resuming) skips a corrupt or unverified step
to the newest one that verifies, and says so. A step without the manifest (written by an older
version, or killed between the commit and the manifest) is read with a warning by
:func:`load_params` and skipped by :func:`restore_state`.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from safety_mech import files

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint (one-line message)."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_checkpoint_manager(directory: str, *, max_to_keep: int = 2, create: bool = True) -> ocp.CheckpointManager:
    """A manager over ``directory`` (``<workdir>/checkpoints``) keeping the newest ``max_to_keep``;
    ``create=False`` for reading an existing directory."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _split(state):
    fields = state._asdict()
    params = fields.pop("params")
    return params, fields


def save_state(manager: ocp.CheckpointManager, state) -> int:
    """Save ``state`` at its own step (replicas: the common step). Returns the step; saving a step
    that is already on disk is a no-op (a finished run resumed again)."""
    step = int(jax.device_get(state.step).reshape(-1)[0])
    if step in manager.all_steps():
        return step
    params, rest = _split(state)
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               state=ocp.args.StandardSave(rest)), force=True)
    manager.wait_until_finished()
    if jax.process_index() == 0:
        files.write_manifest(step_dir(str(manager.directory), step))
    return step


def step_dir(directory: str, step: int) -> str:
    return os.path.join(directory, str(step))


def check_step(directory: str, step: int) -> str | None:
    """None when checkpoint ``step`` in ``directory`` matches its ``SHA256SUMS``, else the problem."""
    return files.check_manifest(step_dir(directory, step))


def latest_step(directory: str) -> int | None:
    """The newest complete checkpoint in ``directory``, or None (also when it does not exist)."""
    if not os.path.isdir(directory):
        return None
    return make_checkpoint_manager(directory, create=False).latest_step()


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_state(manager: ocp.CheckpointManager, template, step: int | None = None):
    """The state saved at ``step`` (default: latest), with the structure, dtypes and shardings of
    ``template`` (a state of the same run, e.g. freshly initialised)."""
    directory = str(manager.directory)
    if step is None:
        for candidate in sorted(manager.all_steps(), reverse=True):
            problem = check_step(directory, candidate)
            if problem is None:
                step = candidate
                break
            logging.warning("checkpoint %s is not usable (%s): skipped", step_dir(directory, candidate), problem)
    elif (problem := check_step(directory, step)) is not None:
        raise CheckpointError(f"checkpoint {step_dir(directory, step)} is not usable: {problem}; "
                              "delete it to resume from an earlier one")
    if step is None and not manager.all_steps():
        raise CheckpointError(f"no checkpoint found in {directory}")
    if step is None:
        raise CheckpointError(f"no checkpoint that verifies in {directory}; delete the directory to start over")
    params, rest = _split(template)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params)), state=ocp.args.StandardRestore(_abstract(rest))))
    except Exception as e:  # orbax raises many types for missing/truncated files
        raise CheckpointError(f"cannot restore step {step} from {directory}: {_one_line(e)}") from None
    return template._replace(params=restored["params"], **restored["state"])


def load_params(directory: str, step: int | None = None) -> dict:
    """Parameters (plain nested dict of host numpy arrays) saved at ``step`` (default: latest) in
    ``directory`` (a ``checkpoints/`` folder or a run directory holding one).

    Independent of the writer's topology: the arrays are restored as numpy arrays whatever mesh
    and device count saved them (a run pretrained on 4 devices fine-tunes on 1); place them with
    ``sharding.put_replicated``."""
    if os.path.isdir(os.path.join(directory, CHECKPOINT_DIR)):
        directory = os.path.join(directory, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint directory {directory}")
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    # Both items registered so reading the metadata does not warn about the unread ``state`` item.
    manager = ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers={
        "params": ocp.PyTreeCheckpointHandler(), "state": ocp.PyTreeCheckpointHandler()})
    step = manager.latest_step() if step is None else step
    if step is None:
        manager.close()
        raise CheckpointError(f"no checkpoint found in {directory}")
    problem = check_step(directory, step)
    if problem == f"no {files.MANIFEST}":
        logging.warning("checkpoint %s has no %s: read unverified", step_dir(directory, step), files.MANIFEST)
    elif problem:
        manager.close()
        raise CheckpointError(f"checkpoint {step_dir(directory, step)} is corrupt: {problem}; "
                              "retrain the run or restore its files")
    try:
        # Without explicit restore types orbax rebuilds the writer's shardings, which fails
        # ("Topology mismatch") on another device count.
        tree = manager.item_metadata(step)["params"].tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.PyTreeRestore(restore_args=as_numpy)))
    except Exception as e:  # orbax raises many types for missing/truncated files
        raise CheckpointError(f"cannot load params of step {step} from {directory}: {_one_line(e)}") from None
    finally:
        manager.close()
    return restored["params"]

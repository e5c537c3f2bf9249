"""Run directories written directly, as ``study.pretrain`` leaves them (config.json + a checkpoint
of the [R]-stacked training state), at freshly initialised params: the evaluation and analysis
tests need some run, not a trained one, and skipping training saves compiling its step."""
import json
import os

import jax
import numpy as np

from configs import pretrain as pt_config
from safety_mech import checkpoint, optim, setups, train
from safety_mech import model as model_lib

MICRO_MODEL = dict(n_layer=1, n_head=2, d_model=16, d_mlp=32)


def micro_pretrain_config(model=MICRO_MODEL, lrs=(1e-3,), seeds=(0,)):
    """The tiny preset with a micro model, 3..4-letter texts and the given replicas."""
    cfg = pt_config.get_config("tiny")
    cfg.model.update(model)
    cfg.data.update(min_len=3, max_len=4, seq_len=0)
    cfg.opt.update(lrs=tuple(lrs), warmup_steps=2, decay_end_step=4)
    cfg.train.update(steps=5, batch_size=8, seeds=tuple(seeds), log_every=1, eval_every=0, ckpt_every=0)
    cfg.eval.update(n_periodic=8, n_final=8, batch_size=8, sets=("safe",))
    return cfg


def write_pretrain_run(workdir, cfg, step: int = 0, params_fn=None) -> str:
    """``workdir`` as a pretraining run of ``cfg`` with one checkpoint at ``step`` (of the params
    ``params_fn(params)`` when given: a broken checkpoint)."""
    setup = setups.validate_pretrain(cfg)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    state = train.init_replicas(setup.opt.lrs, setup.train.seeds, lambda k: model_lib.init_params(k, setup.model),
                                optim.make_optimizer(setup.opt))
    state = state._replace(step=np.full(state.step.shape, step, np.int32))
    if params_fn is not None:
        state = state._replace(params=params_fn(jax.tree.map(np.array, state.params)))  # writable copies
    manager = checkpoint.make_checkpoint_manager(checkpoint.checkpoint_dir(str(workdir)))
    try:
        checkpoint.save_state(manager, state)
    finally:
        manager.close()
    return str(workdir)

"""Pretrain (instruction-tune) the model of SPEC §5.

    python -m launch.pretrain --config configs/pretrain.py:tiny --workdir runs/pretrain_tiny \\
        [--config.opt.lr=3e-3 ...] [--distributed]

Writes ``<workdir>/config.json``, ``metrics.jsonl`` and ``checkpoints/``; rerunning with the same
workdir resumes from the latest checkpoint (the config must match, except logging, evaluation and
checkpoint cadence). Bad input is a one-line error and a non-zero exit, with nothing overwritten.
The logic is :func:`run`, importable from a notebook.
"""
from __future__ import annotations

import jax
from absl import app, logging

from configs import pretrain as pretrain_config
from launch import common
from safety_mech import data as data_lib
from safety_mech import losses
from safety_mech import model as model_lib


def run(cfg, workdir: str, *, distributed: bool = False) -> dict:
    """Validate ``cfg``, then train (or resume) in ``workdir``; returns the final metrics record."""
    setup = pretrain_config.validate(cfg)
    config_dict = cfg.to_dict()
    resume = common.check_workdir(workdir, config_dict)
    mesh = common.make_run_mesh(setup.train.batch_size, distributed)

    def init_params(key):
        return model_lib.init_params(key, setup.model)

    n_params = model_lib.count_params(jax.eval_shape(init_params, jax.random.key(0)), exclude_head=False)
    logging.info("pretraining model %s: %d parameters", setup.model, n_params)
    return common.train_job(
        setup, workdir, config_dict, resume, init_params, losses.lm_loss,
        lambda key, step: data_lib.sample_pretrain_batch(key, setup.data, setup.train.batch_size, step),
        mesh=mesh, tokens_per_example=setup.data.T)


def main(argv):
    common.launch(argv, ("config", "workdir"),
                  lambda: run(common.CONFIG.value, common.WORKDIR.value, distributed=common.DISTRIBUTED.value))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)

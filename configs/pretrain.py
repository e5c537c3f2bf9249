"""Pretraining (instruction tuning in the paper's words), SPEC §5.

    python -m launch.pretrain --config configs/pretrain.py:tiny  --workdir runs/pretrain_tiny
    python -m launch.pretrain --config configs/pretrain.py:paper --workdir runs/pretrain_paper
    python -m launch.pretrain --config configs/pretrain.py:paper --workdir runs/pt_lrs \\
        "--config.opt.lrs=(3e-4,1e-3,3e-3)"       # three learning rates as replicas of one run

Presets (``get_config("tiny" | "paper" | "micro")``):

* ``tiny``: the CPU default, shipped pretrained as ``safety_mech/bases/tiny`` (the default study
  starts from it). 2 prenorm layers, d=96, learned positions, text of exactly 12 letters (sequences
  of 46 tokens, padded to 54 so that the soft-token attack's 8 extra positions exist), four i.i.d.
  operators in every example, batch 128, 6000 steps: 15 minutes on a 2-core CPU VM; Instruct
  (``eval/safe/gen_instruct``) 1.000 on 1000 held-out safe inputs. How it was chosen:
  ``docs/experiments.md``.
* ``paper``: SPEC §5 exactly (6 layers, 6 heads, d=192, sinusoidal positions, 2,688,000 parameters,
  text 25..35, batch 512, 100k steps; packed rows), with the fast GPU path on: bfloat16 matmuls
  (parameters, optimizer state, LayerNorm, softmax and the residual stream stay float32) and fused
  attention. For a GPU/TPU (``docs/performance.md``); on a CPU add
  ``--config.model.dtype=float32 --config.model.attention=einsum``. Expected: Instruct close to 1.
* ``micro``: a smoke test of every code path (1 layer, d=16, text 6, 6 steps); learns nothing.
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from configs.common import check_size


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    check_size(arg)
    c = ml_collections.ConfigDict()
    c.data = dict(
        min_len=25,  # operand text window length, uniform in [min_len, max_len] (SPEC §3)
        max_len=35,
        seq_len=0,  # sequence length T; 0: 3·max_len + 10, the shortest that holds every example
        p_four_iid=0.5,  # operators: four i.i.d. draws with this probability, else ( r4 r3 + three
        p_null_op=0.01,  # one slot replaced by a null operator ex1/ex2
        mode_probs_start=(0.5, 0.1, 0.2, 0.2),  # curriculum (pcfg, full, comp1, comp2) at the start
        mode_probs_end=(0.1, 0.2, 0.3, 0.4),  # ... at curriculum_end_step
        curriculum_hold_steps=placeholder(int),  # unset: opt.warmup_steps // 2 (SPEC §5)
        curriculum_end_step=placeholder(int),  # unset: train.steps
        p_unsafe=0.2,  # (fine-tuning only)
        per_batch_mixing=False,  # (fine-tuning only)
        p_second_pair=0.2,  # (fine-tuning and evaluation) unsafe version: only pair 2 unsafe
    )
    c.model = dict(
        n_layer=6,
        n_head=6,
        d_model=192,
        d_mlp=768,
        block="paper",  # "paper" (REF: x = LN1(x) before attention, no norm before the MLP) | "prenorm"
        pos="sinusoidal",  # "sinusoidal" | "learned"
        ln_eps=1e-5,
        dtype="float32",  # compute dtype of the matmuls: "float32" | "bfloat16" (paper: bfloat16)
        attention="einsum",  # "einsum" | "fused" (jax.nn.dot_product_attention: cuDNN on a GPU; paper: fused)
    )
    c.opt = dict(
        lrs=(1e-3,),  # peak learning rates; each is a replica group of one compiled run
        min_lr=1e-5,  # reached at decay_end_step, constant after
        warmup_steps=20_000,  # linear warmup
        decay_end_step=80_000,  # end of the cosine decay
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=1e-4,  # AdamW, dense kernels only
        clip_norm=1.0,  # global-norm clip; 0 disables
    )
    c.train = dict(
        steps=100_000,
        batch_size=512,
        seeds=(0,),  # one replica per seed and learning rate
        log_every=100,
        eval_every=5_000,  # 0: only the final evaluation
        ckpt_every=5_000,  # 0: only the final checkpoint
        keep_checkpoints=2,
        pack=False,  # pack short examples into shared rows (pretraining only)
    )
    c.eval = dict(
        seed=1234,  # key of the held-out evaluation sets
        n_periodic=1000,  # examples per set at every eval_every
        n_final=1000,  # examples per set in the final evaluation
        batch_size=1000,  # examples per compiled call
        sets=("safe",),
    )
    c.loss = dict(normalize="tokens")  # LM loss per example: mean over its target tokens
    if arg == "paper":  # for a GPU/TPU: float32 params and optimizer state, bfloat16 matmuls
        c.model.update(dtype="bfloat16", attention="fused")
        c.train.pack = True
    if arg in ("tiny", "micro"):
        c.data.update(min_len=12, max_len=12, seq_len=54, p_four_iid=1.0, mode_probs_start=(0.1, 0.3, 0.3, 0.3),
                      mode_probs_end=(0.05, 0.35, 0.3, 0.3))
        c.model.update(n_layer=2, n_head=4, d_model=96, d_mlp=384, block="prenorm", pos="learned")
        c.opt.update(lrs=(3e-3,), min_lr=3e-5, warmup_steps=100, decay_end_step=6000)
        c.train.update(steps=6000, batch_size=128, log_every=50, eval_every=1000, ckpt_every=1000)
        c.eval.update(n_periodic=256, n_final=1000, batch_size=500)
    if arg == "micro":
        c.data.update(min_len=6, max_len=6, seq_len=0)
        c.model.update(n_layer=1, n_head=2, d_model=16, d_mlp=32)
        c.opt.update(warmup_steps=2, decay_end_step=6)
        c.train.update(steps=6, log_every=3, eval_every=6, ckpt_every=6)
        c.eval.update(n_periodic=8, n_final=8, batch_size=8)
    return c

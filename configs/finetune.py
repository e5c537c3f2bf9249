"""Safety fine-tuning (SPEC §7-§8): SSFT, DPO or unlearning from a pretrained (or fine-tuned) base run.

    python -m launch.finetune --config configs/finetune.py:ssft:tiny --base runs/pretrain_tiny \\
        --workdir runs/ssft_tiny
    python -m launch.finetune --config configs/finetune.py:dpo:paper --base runs/pretrain_paper \\
        --workdir runs/dpo_paper
    # textbook DPO (one β for both terms):   --config.method.beta=0.1
    # cross-method (unlearning after SSFT's first replica):
    python -m launch.finetune --config configs/finetune.py:unlearn:tiny --base runs/ssft_tiny \\
        --base_replica 0 --workdir runs/ssft_then_unlearn_tiny

``get_config("METHOD:SIZE")``, METHOD in ssft|dpo|unlearn, SIZE in tiny|paper|micro. The model and
the data lengths (``data.min_len``, ``max_len``, ``seq_len``) are unset here and read from the base
run's ``config.json`` at launch; setting one to a value the base was not trained with is a one-line
error. Every replica (``opt.lrs`` × ``train.seeds``) starts from the base params with a fresh
optimizer state and its own data stream; the safe/unsafe mix is per example with SPEC's
``data.p_unsafe`` (SSFT 0.2, DPO 0.5, unlearning 0.5).

* ``paper``: SPEC §8 exactly: 10k steps, batch 512, warmup 2k, cosine to 1e-6 at step 8k,
  ηM = 1e-4 and ηS = 1e-5; for a GPU/TPU (base: the ``pretrain.py:paper`` run).
* ``tiny``: the CPU default, from the shipped base: batch 16, ηM = 2e-3 and ηS = 2e-4, seeds 0 and 1
  (four replicas), 1200 steps for SSFT and 400 for DPO and unlearning (whose ascent term erodes
  Instruct the longer they train), warmup a fifteenth of the run, cosine to 1e-6 at its end: about
  2.5, 2 and 1.5 minutes on a 2-core CPU VM. Numbers: ``docs/results/`` and
  ``docs/experiments.md``.
* ``micro``: 4 steps of batch 8; learns nothing (smoke test).

What to look at: ``train/logp_desired`` rises and ``train/logp_undesired`` falls (SSFT,
unlearning); ``train/reward_margin`` rises from 0 (DPO starts at loss log 2 = 0.693);
``eval/safe/gen_instruct`` stays near the base's while ``eval/unsafe/gen_null`` rises.
Unlearning's loss has no lower bound (as REF).
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from configs.common import SIZES

METHODS = ("ssft", "dpo", "unlearn")
P_UNSAFE = {"ssft": 0.2, "dpo": 0.5, "unlearn": 0.5}  # SPEC §7
# tiny: DPO's and unlearning's unbounded ascent on the undesired completion erodes Instruct as
# training goes on, so they get a third of SSFT's steps (docs/experiments.md)
TINY_STEPS = {"ssft": 1200, "dpo": 400, "unlearn": 400}


def get_config(arg: str = "ssft:tiny") -> ml_collections.ConfigDict:
    method, _, size = arg.partition(":")
    if method not in METHODS or size not in SIZES:
        raise ValueError(f"unknown config {arg!r}; use METHOD:SIZE with METHOD in {METHODS}, SIZE in {SIZES}")
    c = ml_collections.ConfigDict()
    c.data = dict(
        min_len=placeholder(int),  # from the base run
        max_len=placeholder(int),  # from the base run
        seq_len=placeholder(int),  # from the base run
        p_unsafe=P_UNSAFE[method],  # fraction of unsafe examples (SPEC §7)
        per_batch_mixing=False,  # True: one safe/unsafe coin per batch (REF)
        p_second_pair=0.2,  # unsafe version: pair 1 set to "( (", only pair 2 unsafe
    )
    c.model = dict(n_layer=placeholder(int), n_head=placeholder(int), d_model=placeholder(int),
                   d_mlp=placeholder(int), block=placeholder(str), pos=placeholder(str),
                   ln_eps=placeholder(float), dtype=placeholder(str), attention=placeholder(str))  # from the base run
    c.opt = dict(
        lrs=(1e-4, 1e-5),  # ηM and ηS (SPEC §8)
        min_lr=1e-6,
        warmup_steps=2_000,
        decay_end_step=8_000,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=1e-4,
        clip_norm=1.0,
    )
    c.train = dict(steps=10_000, batch_size=512, seeds=(0,), log_every=100, eval_every=1_000, ckpt_every=1_000,
                   keep_checkpoints=2, pack=False)
    c.eval = dict(seed=1234, n_periodic=1000, n_final=1000, batch_size=1000, sets=("safe", "unsafe"))
    c.method = dict(
        name=method,
        normalize="seq_len",  # completion loss Σ CE / N with N = T − 1 (REF's); "tokens" | "none"
        beta_w=0.1,  # DPO: β of the desired (chosen) completion (REF)
        beta_l=0.01,  # DPO: β of the undesired (rejected) completion (REF)
        beta=placeholder(float),  # DPO: one β for both terms (textbook DPO); overrides beta_w, beta_l
        w_w=1.0,  # unlearning: weight of the desired completion's loss (REF)
        w_l=0.1,  # unlearning: weight of the ascended undesired completion's loss (REF)
    )
    if size in ("tiny", "micro"):
        steps = TINY_STEPS[method]
        c.opt.update(lrs=(2e-3, 2e-4), warmup_steps=steps // 15, decay_end_step=steps)
        c.train.update(steps=steps, batch_size=16, seeds=(0, 1), log_every=100, eval_every=steps,
                       ckpt_every=steps // 4)  # a killed run resumes within a quarter of the run
        c.eval.update(n_periodic=256, n_final=1000, batch_size=500)
    if size == "micro":
        c.opt.update(warmup_steps=1, decay_end_step=4)
        c.train.update(steps=4, batch_size=8, seeds=(0,), log_every=2, eval_every=4, ckpt_every=4)
        c.eval.update(n_periodic=8, n_final=8, batch_size=8)
    return c

"""Does the pretrained base read the text's grammar branch (the "concept") before fine-tuning, and what
does SSFT make of it? Candidate tiny bases: the shipped preset, a grammar-heavy curriculum (the
paper's 0.5 text-only start), more layers and width, longer pretraining, ranged text lengths.

    python -m launch.sweep --sweep configs/sweeps/concept_feature.py --workdir runs/concept_feature
    python -m launch.sweep --sweep configs/sweeps/concept_feature.py --workdir runs/concept_feature \\
        --stage finetune          # then SSFT (the tiny recipe, 4 replicas) from each base

Pretrain stage: held-out logistic-probe accuracy of each block's residual for the branch and for
unsafe vs safe (``analysis.probes``, 4000 inputs per set), against the Bayes reading of the same
text (0.962 at 12 letters, ``analysis.bayes``). Pretraining times on a 2-core CPU VM: 15, 4, 16 and
30 minutes for points 1, 2, 3 and 5 (point 5 with another job on the machine); point 4 took 2.4 hours
on one core with other jobs on the other. Results and readings: ``docs/experiments.md`` §5.
"""
from configs import reproduce

PAPER_CURRICULUM = {"pretrain.data.mode_probs_start": (0.5, 0.1, 0.2, 0.2),
                    "pretrain.data.mode_probs_end": (0.1, 0.2, 0.3, 0.4)}
WIDE = {"pretrain.model.n_layer": 4, "pretrain.model.d_model": 128, "pretrain.model.d_mlp": 512,
        "pretrain.opt.warmup_steps": 200}


def steps(n: int) -> dict:
    return {"pretrain.train.steps": n, "pretrain.opt.decay_end_step": n}


def get_sweep():
    config = reproduce.get_config("tiny")
    config.base = ""  # pretrain every candidate here (the shipped base is the first point's run)
    return dict(
        config=config,
        points=[
            {},  # the tiny preset: text 12, 2 layers, d=96, 6000 steps
            {**PAPER_CURRICULUM, **steps(2500)},
            {**PAPER_CURRICULUM, **WIDE, **steps(4000), "pretrain.opt.lrs": 2e-3},
            {**PAPER_CURRICULUM, **WIDE, **steps(10_000), "pretrain.opt.lrs": 2e-3},
            {"pretrain.data.min_len": 8, "pretrain.data.max_len": 16, "pretrain.data.seq_len": 66},
        ],
        metrics={"pretrain": ("probe/text_branch", "probe/unsafe_vs_safe", "eval/safe/gen_instruct"),
                 "finetune": ("ssft/eval/unsafe/gen_null", "ssft/eval/safe/gen_instruct")},
        stage="pretrain",
        methods=("ssft",),
        plot="pretrain.train.steps",
    )

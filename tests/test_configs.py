"""The presets of configs/ (data only), validated by safety_mech/setups.py against SPEC §5 and §8;
launch/pretrain.py's one-line errors for bad flags."""
import os
import subprocess
import sys

import jax
import pytest

from configs import common
from configs import analyze as an_config
from configs import evaluate as ev_config
from configs import finetune as ft_config
from configs import pretrain as pt_config
from configs import reproduce as repro_config
from safety_mech import attacks
from safety_mech import setups, study
from safety_mech import model as model_lib
from safety_mech.analysis.suite import AnalysisConfig
from safety_mech.evaluation import EvaluationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}


def test_paper_preset_is_spec_section_5():
    s = setups.validate_pretrain(pt_config.get_config("paper"))
    m = s.model
    assert (m.n_layer, m.n_head, m.d_model, m.d_mlp, m.block, m.pos) == (6, 6, 192, 768, "paper", "sinusoidal")
    assert (m.vocab_size, m.seq_len, s.data.T) == (54, 115, 115)
    assert (s.data.min_len, s.data.max_len) == (25, 35)
    assert (s.train.steps, s.train.batch_size, s.train.seeds, s.loss.normalize) == (100_000, 512, (0,), "tokens")
    assert s.loss.model == m
    o = s.opt
    assert (o.lrs, o.min_lr, o.warmup_steps, o.decay_end_step) == ((1e-3,), 1e-5, 20_000, 80_000)
    assert (o.b1, o.b2, o.weight_decay, o.clip_norm) == (0.9, 0.95, 1e-4, 1.0)
    assert (s.data.curriculum_hold_steps, s.data.curriculum_end_step) == (10_000, 100_000)
    assert s.data.mode_probs_start == (0.5, 0.1, 0.2, 0.2) and s.data.mode_probs_end == (0.1, 0.2, 0.3, 0.4)
    assert (s.data.p_four_iid, s.data.p_null_op) == (0.5, 0.01)
    shapes = jax.eval_shape(lambda k: model_lib.init_params(k, m), jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(shapes))
    assert n_params == 2_688_000  # SPEC §5: ≈ 2.7M


def test_tiny_preset_and_linked_fields():
    cfg = pt_config.get_config("tiny")
    s = setups.validate_pretrain(cfg)
    # the text's sequences plus room for the soft-token attack's largest k (attacks.KS)
    assert s.data.T == s.model.seq_len == 3 * s.data.max_len + 10 + max(attacks.KS)
    assert s.data.curriculum_end_step == s.train.steps
    cfg.train.steps, cfg.opt.warmup_steps = 50, 40  # a smoke run: curriculum follows, hold is clamped
    s = setups.validate_pretrain(cfg)
    assert (s.data.curriculum_hold_steps, s.data.curriculum_end_step) == (20, 50)
    cfg.opt.warmup_steps = 400
    assert setups.validate_pretrain(cfg).data.curriculum_hold_steps == 50
    for size in common.SIZES:
        setups.validate_pretrain(pt_config.get_config(size))
    with pytest.raises(ValueError, match="unknown preset"):
        pt_config.get_config("huge")


def test_paper_finetune_preset_is_spec_section_8():
    base = pt_config.get_config("paper").to_dict()
    base_model = setups.validate_pretrain(pt_config.get_config("paper")).model
    for method, p_unsafe in (("ssft", 0.2), ("dpo", 0.5), ("unlearn", 0.5)):
        s = setups.validate_finetune(setups.inherit_from_base(ft_config.get_config(f"{method}:paper"), base))
        assert s.method.name == method and s.data.p_unsafe == p_unsafe and not s.data.per_batch_mixing
        assert (s.train.steps, s.train.batch_size, s.train.seeds) == (10_000, 512, (0,))
        o = s.opt
        assert (o.warmup_steps, o.decay_end_step, o.min_lr, o.lrs) == (2000, 8000, 1e-6, (1e-4, 1e-5))  # ηM, ηS
        assert (o.b1, o.b2, o.weight_decay, o.clip_norm) == (0.9, 0.95, 1e-4, 1.0)
        assert s.model == base_model == s.method.model and s.loss is s.method
        assert (s.data.min_len, s.data.max_len, s.data.T, s.data.p_second_pair) == (25, 35, 115, 0.2)
        assert s.method.normalize == "seq_len"
    m = s.method
    assert (m.betas, m.w_w, m.w_l) == ((0.1, 0.01), 1.0, 0.1)
    for size in ft_config.SIZES:
        for method in ft_config.METHODS:
            base = pt_config.get_config(size).to_dict()
            setups.validate_finetune(setups.inherit_from_base(ft_config.get_config(f"{method}:{size}"), base))
    with pytest.raises(ValueError, match="METHOD:SIZE"):
        ft_config.get_config("dpo")


def test_evaluate_analyze_and_reproduce_presets():
    for size in common.SIZES:
        e = setups.validate_flat(EvaluationConfig, ev_config.get_config(size), "evaluate")
        a = setups.validate_flat(AnalysisConfig, an_config.get_config(size), "analyze")
        assert e.sets == a.sets == ("safe", "unsafe", "jb_co_task", "jb_co_text", "jb_misgen_text", "jb_misgen_tokens")
        assert e.attack and e.n is not None and e.name is None and e.ckpt_step is None
        assert a.n_heldout is None and a.base_replica is None and a.arithmetic == ()
        st = study.validate(repro_config.get_config(size))
        assert st.evaluate == e and st.analyze == a
        assert st.pretrain == setups.validate_pretrain(pt_config.get_config(size))
        assert sorted(st.finetune) == sorted(ft_config.METHODS)
    assert ev_config.get_config("paper").sweep_budget and ev_config.get_config("paper").sweep_k
    assert an_config.get_config("paper").n == 1000 and ev_config.get_config("micro").attack_steps == 3
    for module in (ev_config, an_config, repro_config):
        with pytest.raises(ValueError, match="unknown"):
            module.get_config("huge")


@pytest.mark.parametrize("override,match", [
    ("--config.opt.lrs=(-1.0,)", "lrs must be one or more learning rates > 0"),
    ("--config.opt.momentum=0.9", "momentum"),
])
def test_cli_bad_input_exits_with_one_line(tmp_path, override, match):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.pretrain", "--config", "configs/pretrain.py:tiny",
         f"--workdir={workdir}", override], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and match in last, proc.stderr[-2000:]
    assert not workdir.exists()

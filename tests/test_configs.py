"""configs/pretrain.py presets and validation; launch/pretrain.py input errors."""
import json
import os
import subprocess
import sys

import jax
import pytest

from configs import pretrain
from launch import common
from safety_mech import model as model_lib
from safety_mech.train import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paper_preset_is_spec_section_5():
    s = pretrain.validate(pretrain.get_config("paper"))
    m = s.model
    assert (m.n_layer, m.n_head, m.d_model, m.d_mlp, m.block, m.pos) == (6, 6, 192, 768, "paper", "sinusoidal")
    assert (m.vocab_size, m.seq_len, s.data.T) == (54, 115, 115)
    assert (s.data.min_len, s.data.max_len) == (25, 35)
    assert (s.train.steps, s.train.batch_size, s.train.normalize) == (100_000, 512, "tokens")
    o = s.opt
    assert (o.lr, o.min_lr, o.warmup_steps, o.decay_end_step) == (1e-3, 1e-5, 20_000, 80_000)
    assert (o.b1, o.b2, o.weight_decay, o.clip_norm) == (0.9, 0.95, 1e-4, 1.0)
    assert (s.data.curriculum_hold_steps, s.data.curriculum_end_step) == (10_000, 100_000)
    assert s.data.mode_probs_start == (0.5, 0.1, 0.2, 0.2) and s.data.mode_probs_end == (0.1, 0.2, 0.3, 0.4)
    shapes = jax.eval_shape(lambda k: model_lib.init_params(k, m), jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(shapes))
    assert n_params == 2_688_000  # SPEC §5: ≈ 2.7M


def test_tiny_preset_and_linked_fields():
    cfg = pretrain.get_config("tiny")
    s = pretrain.validate(cfg)
    assert s.data.T == s.model.seq_len == 3 * s.data.max_len + 10
    assert s.data.curriculum_end_step == s.train.steps
    cfg.train.steps, cfg.opt.warmup_steps = 50, 40  # a smoke run: curriculum follows, hold is clamped
    s = pretrain.validate(cfg)
    assert (s.data.curriculum_hold_steps, s.data.curriculum_end_step) == (20, 50)
    cfg.opt.warmup_steps = 400
    assert pretrain.validate(cfg).data.curriculum_hold_steps == 50
    with pytest.raises(ValueError, match="unknown preset"):
        pretrain.get_config("huge")


@pytest.mark.parametrize("group,key,value,match", [
    ("opt", "lr", -1.0, "lr must be > 0"),
    ("opt", "min_lr", 1.0, "min_lr <= lr"),
    ("opt", "b2", 1.0, "b2 must be in"),
    ("opt", "replica_lrs", (1e-3, 3e-3), "replica_lrs"),
    ("train", "steps", 0, "steps must be >= 1"),
    ("train", "normalize", "mean", "normalize"),
    ("data", "mode_probs_start", (0.5, 0.5, 0.5, 0.5), "summing to 1"),
    ("data", "p_null_op", 1.5, "p_null_op"),
    ("data", "min_len", 0, "min_len"),
    ("model", "block", "postnorm", "block"),
    ("model", "pos", "rope", "pos"),
    ("model", "d_model", 130, "divisible"),
    ("model", "n_layer", 0, "n_layer"),
    ("eval", "sets", ("safe", "nope"), "unknown evaluation set"),
])
def test_invalid_values_are_one_line_errors(group, key, value, match):
    cfg = pretrain.get_config("tiny")
    cfg[group][key] = value
    with pytest.raises(ConfigError, match=match) as err:
        pretrain.validate(cfg)
    assert "\n" not in str(err.value)


def test_unknown_and_derived_keys_are_rejected():
    cfg = pretrain.get_config("tiny")
    with cfg.opt.unlocked():
        cfg.opt.momentum = 0.9
    with pytest.raises(ConfigError, match=r"unknown key\(s\) config.opt.{momentum}"):
        pretrain.validate(cfg)
    cfg = pretrain.get_config("tiny")
    cfg.model.seq_len = 160
    with pytest.raises(ConfigError, match="config.model.seq_len is derived"):
        pretrain.validate(cfg)
    cfg = pretrain.get_config("tiny")
    cfg.method = {"beta": 0.1}
    with pytest.raises(ConfigError, match="config groups"):
        pretrain.validate(cfg)


def test_workdir_with_other_config_is_refused(tmp_path):
    cfg = pretrain.get_config("tiny")
    workdir = str(tmp_path)
    assert common.check_workdir(workdir, cfg.to_dict()) is False  # empty: start
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    cfg.train.log_every = 7  # cadence changes are fine
    assert common.check_workdir(workdir, cfg.to_dict()) is False  # no checkpoint yet
    cfg.opt.lr = 1e-2
    with pytest.raises(common.RunError, match=r"different config \(opt.lr\)"):
        common.check_workdir(workdir, cfg.to_dict())


@pytest.mark.parametrize("override,match", [
    ("--config.opt.lr=-1", "lr must be > 0"),
    ("--config.opt.momentum=0.9", "momentum"),
])
def test_cli_bad_input_exits_with_one_line(tmp_path, override, match):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.pretrain", "--config", "configs/pretrain.py:tiny",
         f"--workdir={workdir}", override], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and match in last, proc.stderr[-2000:]
    assert not workdir.exists()

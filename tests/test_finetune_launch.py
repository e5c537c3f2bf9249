"""configs/finetune.py presets and launch/finetune.py end to end on a micro base run: every method
with 2 replicas, cross-method fine-tuning from a replica of a fine-tuned run, the recorded base, the
unsaved DPO reference, one-line errors for bad bases."""
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import finetune as ft_config
from configs import pretrain as pt_config
from launch import finetune as launch_finetune
from launch import pretrain as launch_pretrain
from safety_mech import checkpoint
from safety_mech.train import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5
MICRO_MODEL = dict(n_layer=1, n_head=2, d_model=16, d_mlp=32)
SMALL_EVAL = dict(n_periodic=8, n_final=8, batch_size=8, sets=("safe",))


# ------------------------------------------------------------------ configs


def test_paper_preset_is_spec_section_8():
    base = pt_config.get_config("paper").to_dict()
    for method, p_unsafe in (("ssft", 0.2), ("dpo", 0.5), ("unlearn", 0.5)):
        s = ft_config.validate(ft_config.inherit_from_base(ft_config.get_config(f"{method}:paper"), base))
        assert s.method.name == method and s.data.p_unsafe == p_unsafe and not s.data.per_batch_mixing
        assert (s.train.steps, s.train.batch_size, s.train.n_replicas) == (10_000, 512, 2)
        o = s.opt
        assert (o.warmup_steps, o.decay_end_step, o.min_lr, o.replica_lrs) == (2000, 8000, 1e-6, (1e-4, 1e-5))
        assert (o.b1, o.b2, o.weight_decay, o.clip_norm) == (0.9, 0.95, 1e-4, 1.0)
        assert s.model == pt_config.validate(pt_config.get_config("paper")).model == s.method.model
        assert (s.data.min_len, s.data.max_len, s.data.T, s.data.p_four_iid) == (25, 35, 115, 0.5)
        assert s.method.normalize == s.train.normalize == "seq_len"
    m = s.method
    assert (m.betas, m.w_w, m.w_l) == ((0.1, 0.01), 1.0, 0.1)


def test_config_overrides_and_errors():
    base = pt_config.get_config("tiny").to_dict()
    cfg = ft_config.get_config("dpo:tiny")
    cfg.method.beta = 0.1  # textbook DPO: one change
    cfg.train.normalize = "tokens"  # one field with method.normalize
    s = ft_config.validate(ft_config.inherit_from_base(cfg, base))
    assert s.method.betas == (0.1, 0.1) and s.method.normalize == "tokens"
    assert s.data.T == 3 * base["data"]["max_len"] + 10  # lengths inherited from the base run
    assert s.data.p_four_iid == base["data"]["p_four_iid"]
    with pytest.raises(ConfigError, match="config.model.n_layer is unset"):
        ft_config.validate(cfg)
    cfg.model.d_model = 64
    with pytest.raises(ConfigError, match=rf"config.model.d_model=64 does not match B \(model.d_model={base['model']['d_model']}\)"):
        ft_config.inherit_from_base(cfg, base, "B")
    cfg = ft_config.get_config("unlearn:tiny")
    cfg.method.w_l = -1.0
    with pytest.raises(ConfigError, match="w_l must be >= 0"):
        ft_config.validate(ft_config.inherit_from_base(cfg, base))
    cfg = ft_config.get_config("ssft:tiny")
    cfg.train.pack = True
    with pytest.raises(ConfigError, match="config.train.pack=True applies to pretraining only"):
        ft_config.validate(ft_config.inherit_from_base(cfg, base))
    with pytest.raises(ValueError, match="METHOD:SIZE"):
        ft_config.get_config("dpo")


# ------------------------------------------------------------------ end to end


def _micro_pretrain_config():
    cfg = pt_config.get_config("tiny")
    cfg.model.update(MICRO_MODEL)
    cfg.data.update(min_len=3, max_len=4)
    cfg.opt.update(warmup_steps=2, decay_end_step=4)
    cfg.train.update(steps=STEPS, batch_size=8, log_every=1, eval_every=0, ckpt_every=0)
    cfg.eval.update(SMALL_EVAL)
    return cfg


def _micro_finetune_config(method):
    cfg = ft_config.get_config(f"{method}:tiny")
    cfg.opt.update(warmup_steps=2, decay_end_step=4)
    cfg.train.update(steps=STEPS, batch_size=8, log_every=1, eval_every=0, ckpt_every=0)
    cfg.eval.update(SMALL_EVAL)
    cfg.data.p_unsafe = 0.5  # one DataConfig for all methods: their runs share the compiled eval sets
    return cfg


def _json(path):
    with open(path) as f:
        return json.load(f)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A micro base run, SSFT and DPO from it, unlearning from the SSFT run's replica 1."""
    root = tmp_path_factory.mktemp("ft")
    dirs = {name: str(root / name) for name in ("base", "ssft", "dpo", "unlearn")}
    launch_pretrain.run(_micro_pretrain_config(), dirs["base"])
    finals = {}
    for method, base, replica in (("ssft", "base", None), ("dpo", "base", None), ("unlearn", "ssft", 1)):
        finals[method] = launch_finetune.run(_micro_finetune_config(method), dirs[base], dirs[method],
                                             base_replica=replica)
    return dirs, finals


def test_config_json_records_the_base(runs):
    dirs, _ = runs
    base_config = _json(os.path.join(dirs["base"], "config.json"))
    for method, base, replica in (("ssft", "base", None), ("dpo", "base", None), ("unlearn", "ssft", 1)):
        cfg = _json(os.path.join(dirs[method], "config.json"))
        assert cfg["base"]["path"] == os.path.abspath(dirs[base]) and cfg["base"]["step"] == STEPS
        assert cfg["base"]["replica"] == replica
        assert cfg["base"]["config"] == _json(os.path.join(dirs[base], "config.json"))
        assert cfg["method"]["name"] == method
        assert cfg["model"] == base_config["model"]  # resolved from the base
        assert (cfg["data"]["min_len"], cfg["data"]["max_len"]) == (3, 4)
    assert _json(os.path.join(dirs["unlearn"], "config.json"))["base"]["config"]["base"]["path"] == \
        os.path.abspath(dirs["base"])  # cross-method: the chain back to the pretrained model


def test_metrics_are_finite_and_dpo_starts_at_the_reference(runs):
    dirs, finals = runs
    for method, final in finals.items():
        assert final["step"] == STEPS and final["final"]
        for key in ("train/loss", "train/logp_desired", "train/logp_undesired", "train/accuracy",
                    "eval/safe/gen_instruct"):
            value = np.asarray(final[key])
            assert value.shape == (2,) and np.all(np.isfinite(value)), (method, key, value)
        records = _records(dirs[method])
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # step 1 of DPO: policy == base == reference, so every margin is 0 and the loss is log 2
    first = _records(dirs["dpo"])[0]
    np.testing.assert_allclose(first["train/loss"], [math.log(2)] * 2, rtol=1e-5)
    np.testing.assert_allclose(first["train/reward_margin"], [0.0, 0.0], atol=1e-6)
    assert "train/reward_accuracy" in finals["dpo"] and "train/reward_margin" not in finals["ssft"]


def test_replicas_start_from_the_base_and_dpo_saves_no_reference(runs):
    dirs, _ = runs
    base = checkpoint.load_params(dirs["base"])
    n_base = sum(x.size for x in jax.tree.leaves(base))
    for method in ("ssft", "dpo"):
        ckpt = os.path.join(dirs[method], checkpoint.CHECKPOINT_DIR, str(STEPS))
        items = {d for d in os.listdir(ckpt) if os.path.isdir(os.path.join(ckpt, d))}
        assert items == {"params", "state"}, items
        params = checkpoint.load_params(dirs[method])
        assert jax.tree.structure(params) == jax.tree.structure(base)
        assert sum(x.size for x in jax.tree.leaves(params)) == 2 * n_base  # 2 replicas, no reference
        moved = [float(np.abs(np.asarray(p)[r] - np.asarray(b)).max())
                 for r in (0, 1) for p, b in zip(jax.tree.leaves(params), jax.tree.leaves(base))]
        assert 0 < max(moved) < 0.05  # trained a little, from the base
    assert set(_json(os.path.join(dirs["dpo"], "config.json"))["base"]) == {"path", "step", "replica", "config"}


def test_bad_bases_are_one_line_errors(runs, tmp_path):
    dirs, _ = runs
    cfg = _micro_finetune_config("ssft")
    work = tmp_path / "w"
    cases = [
        (dict(base=str(tmp_path / "nope")), launch_finetune.RunError, "no config.json"),
        (dict(base=dirs["ssft"]), launch_finetune.RunError, r"has 2 replicas; pick one with --base_replica 0..1"),
        (dict(base=dirs["ssft"], base_replica=2), launch_finetune.RunError, "--base_replica 2 outside 0..1"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match) as e:
            launch_finetune.run(cfg, workdir=str(work), **kwargs)
        assert "\n" not in str(e.value) and not work.exists()
    mismatched = _micro_finetune_config("ssft")
    mismatched.data.max_len = 6
    with pytest.raises(ConfigError, match=r"config.data.max_len=6 does not match --base .* \(data.max_len=4\)"):
        launch_finetune.run(mismatched, dirs["base"], str(work))
    # a base whose params are not its config's model
    broken = tmp_path / "broken"
    shutil.copytree(dirs["base"], broken)
    broken_cfg = _json(broken / "config.json")
    broken_cfg["model"]["d_mlp"] = 64
    (broken / "config.json").write_text(json.dumps(broken_cfg))
    first_leaf = r"params\['h_0'\]\['mlp'\]\['c_fc'\]\['bias'\] is float32\[32\]"
    with pytest.raises(launch_finetune.RunError, match=first_leaf):
        launch_finetune.run(cfg, str(broken), str(work))
    assert not work.exists()


def test_cli_mismatched_base_exits_with_one_line(runs, tmp_path):
    dirs, _ = runs
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.finetune", "--config", "configs/finetune.py:dpo:tiny",
         f"--base={dirs['base']}", f"--workdir={workdir}", "--config.model.d_model=32"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config.model.d_model=32 does not match --base"), proc.stderr[-2000:]
    assert not workdir.exists()

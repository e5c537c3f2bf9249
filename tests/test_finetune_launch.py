"""Fine-tuning end to end (safety_mech/study.py, SPEC §7-8) on a micro pretraining run: every method
with 2 replicas, cross-method fine-tuning from a replica of a fine-tuned run, the recorded base, the
unsaved DPO reference, one-line errors for bad bases, from the library and from launch/finetune.py.
(The presets and the config checks: test_configs.py, test_setups.py.)"""
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

import launch_cli
import run_dirs
from configs import finetune as ft_config
from safety_mech import checkpoint, study
from safety_mech.runs import RunError
from safety_mech.setups import ConfigError

STEPS = 5
SMALL_EVAL = dict(n_periodic=8, n_final=8, batch_size=8, sets=("safe",))


def _micro_finetune_config(method):
    cfg = ft_config.get_config(f"{method}:tiny")
    cfg.opt.update(lrs=(1e-3, 1e-4), warmup_steps=2, decay_end_step=4)  # two replicas
    cfg.train.update(steps=STEPS, batch_size=8, seeds=(0,), log_every=1, eval_every=0, ckpt_every=0)
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
    pre_final = study.pretrain(run_dirs.micro_pretrain_config(), dirs["base"])
    finals = {}
    for method, base, replica in (("ssft", "base", None), ("dpo", "base", None), ("unlearn", "ssft", 1)):
        finals[method] = study.finetune(_micro_finetune_config(method), dirs[base], dirs[method], base_replica=replica)
    return dirs, finals, pre_final


def test_config_json_records_the_base(runs):
    dirs, _, _ = runs
    base_config = _json(os.path.join(dirs["base"], "config.json"))
    for method, base, replica in (("ssft", "base", None), ("dpo", "base", None), ("unlearn", "ssft", 1)):
        cfg = _json(os.path.join(dirs[method], "config.json"))
        assert cfg["base"]["path"] == os.path.abspath(dirs[base]) and cfg["base"]["step"] == STEPS
        assert cfg["base"]["replica"] == replica  # None: the base has one replica
        assert cfg["base"]["config"] == _json(os.path.join(dirs[base], "config.json"))
        assert cfg["method"]["name"] == method
        assert cfg["model"] == base_config["model"]  # resolved from the base
        assert (cfg["data"]["min_len"], cfg["data"]["max_len"]) == (3, 4)
    assert _json(os.path.join(dirs["unlearn"], "config.json"))["base"]["config"]["base"]["path"] == \
        os.path.abspath(dirs["base"])  # cross-method: the chain back to the pretrained model


def test_metrics_are_finite_and_dpo_starts_at_the_reference(runs):
    dirs, finals, pre_final = runs
    assert pre_final["step"] == STEPS and np.shape(pre_final["eval/safe/gen_instruct"]) == (1,)
    for method, final in finals.items():
        assert final["step"] == STEPS and final["final"]
        for key in ("train/loss", "train/logp_desired", "train/logp_undesired", "train/accuracy",
                    "eval/safe/gen_instruct", "eval/safe/gen_null", "eval/safe/tf_token_acc"):
            value = np.asarray(final[key])
            assert value.shape == (2,) and np.all(np.isfinite(value)), (method, key, value)
        records = _records(dirs[method])
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        # metrics.jsonl: one number per replica, the evaluation's too
        assert records[-1]["final"] and len(records[-1]["eval/safe/gen_instruct"]) == 2
        assert all(len(r["train/loss"]) == 2 for r in records)
    # step 1 of DPO: policy == base == reference, so every margin is 0 and the loss is log 2
    first = _records(dirs["dpo"])[0]
    np.testing.assert_allclose(first["train/loss"], [math.log(2)] * 2, rtol=1e-5)
    np.testing.assert_allclose(first["train/reward_margin"], [0.0, 0.0], atol=1e-6)
    assert "train/reward_accuracy" in finals["dpo"] and "train/reward_margin" not in finals["ssft"]
    # the replicas train with their own learning rates (1e-3 and 1e-4, warmup 1/2 at step 1)
    np.testing.assert_allclose(_records(dirs["ssft"])[0]["train/lr"], [5e-4, 5e-5], rtol=1e-5)


def test_replicas_start_from_the_base_and_dpo_saves_no_reference(runs):
    dirs, _, _ = runs
    base = checkpoint.load_params(dirs["base"])  # [1, ...]: one replica
    n_base = sum(x.size for x in jax.tree.leaves(base))
    for method in ("ssft", "dpo"):
        ckpt = os.path.join(dirs[method], checkpoint.CHECKPOINT_DIR, str(STEPS))
        items = {d for d in os.listdir(ckpt) if os.path.isdir(os.path.join(ckpt, d))}
        assert items == {"params", "state"}, items
        params = checkpoint.load_params(dirs[method])
        assert jax.tree.structure(params) == jax.tree.structure(base)
        assert sum(x.size for x in jax.tree.leaves(params)) == 2 * n_base  # 2 replicas, no reference
        moved = [float(np.abs(np.asarray(p)[r] - np.asarray(b)[0]).max())
                 for r in (0, 1) for p, b in zip(jax.tree.leaves(params), jax.tree.leaves(base))]
        assert 0 < max(moved) < 0.05  # trained a little, from the base
    assert set(_json(os.path.join(dirs["dpo"], "config.json"))["base"]) == {"path", "step", "replica", "config"}
    # unlearning started from replica 1 of the SSFT run, whose checkpoint is at the same step
    ssft = checkpoint.load_params(dirs["ssft"])
    unlearn = checkpoint.load_params(dirs["unlearn"])
    gap = {r: max(float(np.abs(np.asarray(u)[0] - np.asarray(s)[r]).max())
                  for u, s in zip(jax.tree.leaves(unlearn), jax.tree.leaves(ssft))) for r in (0, 1)}
    assert gap[1] < gap[0], gap


def test_bad_bases_are_one_line_errors(runs, tmp_path):
    dirs, _, _ = runs
    cfg = _micro_finetune_config("ssft")
    work = tmp_path / "w"
    cases = [
        (dict(base=str(tmp_path / "nope")), RunError, r"^--base .*nope: no config.json"),
        (dict(base=dirs["ssft"]), RunError, r"has 2 replicas; pick one with --base_replica 0..1$"),
        (dict(base=dirs["ssft"], base_replica=2), RunError, r"^replica 2 outside 0..1 \(--base .* has 2\)$"),
        (dict(base=str(work)), RunError, "--base and --workdir are the same directory"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match) as e:
            study.finetune(cfg, workdir=str(work), **kwargs)
        assert "\n" not in str(e.value) and not work.exists()
    mismatched = _micro_finetune_config("ssft")
    mismatched.data.max_len = 6
    with pytest.raises(ConfigError, match=r"config.data.max_len=6 does not match --base .* \(data.max_len=4\)"):
        study.finetune(mismatched, dirs["base"], str(work))
    # a base whose params are not its config's model
    broken = tmp_path / "broken"
    shutil.copytree(dirs["base"], broken)
    broken_cfg = _json(broken / "config.json")
    broken_cfg["model"]["d_mlp"] = 64
    (broken / "config.json").write_text(json.dumps(broken_cfg))
    first_leaf = r"params\['h_0'\]\['mlp'\]\['c_fc'\]\['bias'\] is float32\[1, 32\], expected float32\[1, 64\]"
    with pytest.raises(RunError, match=first_leaf):
        study.finetune(cfg, str(broken), str(work))
    assert not work.exists()
    # a base with a byte flipped in its largest params file: corruption, before any step
    corrupt = tmp_path / "corrupt"
    shutil.copytree(dirs["base"], corrupt)
    params_files = [p for p in (corrupt / "checkpoints").rglob("*") if p.is_file() and "params" in p.parts]
    largest = max(params_files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x01
    largest.write_bytes(bytes(data))
    with pytest.raises(RunError, match=r"^--base .*corrupt: checkpoint .* is corrupt: params/.* does not match its "
                                       r"checksum; retrain the run or restore its files$"):
        study.finetune(cfg, str(corrupt), str(work))
    assert not work.exists()


def test_cli_mismatched_base_exits_with_one_line(runs, tmp_path):
    dirs, _, _ = runs
    workdir = tmp_path / "run"
    last = launch_cli.error_line(launch_cli.run(
        "finetune", "--config", "configs/finetune.py:dpo:tiny", f"--base={dirs['base']}", f"--workdir={workdir}",
        "--config.model.d_model=32"))
    assert last.startswith("error: config.model.d_model=32 does not match --base"), last
    assert not workdir.exists()

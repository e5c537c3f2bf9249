"""safety_mech/runs.py: reading a run directory. Every problem with one is a one-line RunError naming
the flag that pointed there; params are checked leaf by leaf (shape, dtype, replica count,
finiteness) against the model the run's config describes."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

import run_dirs
from safety_mech import checkpoint, replicas
from safety_mech.runs import RunDir, RunError, check_new_or_same, config_diff

LRS = (1e-3, 1e-4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A pretraining run directory with two replicas and a checkpoint at step 5."""
    cfg = run_dirs.micro_pretrain_config(lrs=LRS)
    return run_dirs.write_pretrain_run(tmp_path_factory.mktemp("runs") / "pre", cfg, step=5)


def _copy(run, tmp_path, edit=None):
    """A copy of ``run`` whose config.json is ``edit(config)``."""
    path = tmp_path / "copy"
    shutil.copytree(run, path)
    if edit is not None:
        config = json.loads((path / "config.json").read_text())
        edit(config)
        (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _error(fn, match):
    with pytest.raises(RunError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_run_directory(run):
    r = RunDir.open(run, "--base")
    assert r.path == os.path.abspath(run) and r.flag == "--base" and not r.fine_tuned and r.method == "pretrain"
    assert r.setup.opt.lrs == LRS and r.n_replicas == 2 and r.latest_step() == 5
    assert r.model_names() == ["pretrain/lr=0.001/seed=0", "pretrain/lr=0.0001/seed=0"]
    assert r.model_names("mine") == ["mine/lr=0.001/seed=0", "mine/lr=0.0001/seed=0"]
    assert r.chain() == ((), [])
    assert r.metrics.records() == [] and not r.finished()
    params = r.load_params()
    assert all(isinstance(x, np.ndarray) and x.shape[0] == 2 for x in jax.tree.leaves(params))
    one = r.replica_params(1)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(replicas.select(params, 1)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(params["wte"]["embedding"][0], params["wte"]["embedding"][1])


def test_finished_reads_the_final_record(run, tmp_path):
    path = _copy(run, tmp_path)
    r = RunDir.open(path)
    r.metrics.write({"step": 5, "train/loss": [1.0, 2.0]})
    assert not r.finished()
    r.metrics.write({"step": 4, "final": True})  # the final record of another step count
    assert not r.finished()
    r.metrics.write({"step": 5, "final": True})
    assert r.finished() and r.metrics.final() == {"step": 5, "final": True}


@pytest.mark.parametrize("flag", ["--run", "--base", "--runs"])
def test_not_a_run_directory_names_the_flag(tmp_path, flag):
    missing = tmp_path / "nope"
    assert _error(lambda: RunDir.open(str(missing), flag), "no config.json") == \
        f"{flag} {missing}: no config.json (not a run directory)"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{ not json")
    assert _error(lambda: RunDir.open(str(tmp_path / "bad"), flag), "cannot read config.json").startswith(
        f"{flag} {tmp_path / 'bad'}: ")
    (tmp_path / "bad" / "config.json").write_text("[1, 2]")
    assert _error(lambda: RunDir.open(str(tmp_path / "bad"), flag), "not a config").startswith(f"{flag} ")


def test_bad_configs_name_the_flag(run, tmp_path):
    r = RunDir.open(_copy(run, tmp_path, lambda c: c.pop("opt")), "--base")
    _error(lambda: r.setup, rf"^--base {r.path}: config.json has no 'opt' group$")
    shutil.rmtree(tmp_path / "copy")
    r = RunDir.open(_copy(run, tmp_path, lambda c: c["model"].update(n_head=3)), "--base")
    _error(lambda: r.setup, rf"^--base {r.path}: config.json: config.model: .*divisible")
    shutil.rmtree(tmp_path / "copy")
    r = RunDir.open(_copy(run, tmp_path, lambda c: c.update(base={"path": "x"}, method={"name": "ssft"})), "--runs")
    _error(r.chain, rf"^--runs {r.path}: config.json has a malformed 'base' record$")


def test_missing_or_corrupt_checkpoint_names_the_flag(run, tmp_path):
    path = _copy(run, tmp_path)
    shutil.rmtree(os.path.join(path, "checkpoints", "5"))
    r = RunDir.open(path, "--base")
    _error(r.latest_step, rf"^--base {r.path}: no checkpoint in ")
    _error(r.load_params, "no checkpoint")
    shutil.rmtree(tmp_path / "copy")
    path = _copy(run, tmp_path)
    for root, _, names in os.walk(os.path.join(path, "checkpoints", "5", "params")):
        for name in names:  # truncate every data file of the params
            with open(os.path.join(root, name), "w") as f:
                f.write("garbage")
    r = RunDir.open(path, "--run")
    assert _error(r.load_params, r"checkpoints/5 is corrupt: params/.* does not match its checksum").startswith(
        f"--run {r.path}: ")


@pytest.mark.parametrize("edit,match", [
    # the config's model is wider than the checkpoint's: the first leaf (sorted) that differs
    (lambda c: c["model"].update(d_mlp=64),
     r"params\['h_0'\]\['mlp'\]\['c_fc'\]\['bias'\] is float32\[2, 32\], expected float32\[2, 64\] \(2 replica\(s\)\)"),
    # three replicas configured, two saved
    (lambda c: c["opt"].update(lrs=[1e-3, 1e-4, 1e-5]), r"is float32\[2, .*expected float32\[3, .*\(3 replica\(s\)\)"),
    # another tree: a second layer
    (lambda c: c["model"].update(n_layer=2), "do not have the structure of its config's model"),
])
def test_params_that_do_not_fit_the_config_are_rejected(run, tmp_path, edit, match):
    r = RunDir.open(_copy(run, tmp_path, edit), "--base")
    message = _error(r.load_params, match)
    assert message.startswith(f"--base {r.path}: params")


def test_non_finite_params_are_rejected(run, tmp_path):
    def poison(params):
        params["h_0"]["mlp"]["c_proj"]["kernel"][1, 0, 0] = np.nan  # replica 1 only
        return params

    cfg = run_dirs.micro_pretrain_config(lrs=LRS)
    path = run_dirs.write_pretrain_run(tmp_path / "nan", cfg, step=3, params_fn=poison)
    r = RunDir.open(path, "--base")
    _error(r.load_params, rf"^--base {r.path}: params\['h_0'\]\['mlp'\]\['c_proj'\]\['kernel'\] at step 3 holds NaN or inf; retrain")
    _error(lambda: r.replica_params(0), "holds NaN")  # the run as a whole is unusable


def test_replica_selection(run):
    r = RunDir.open(run, "--base")
    _error(lambda: r.replica_params(None), rf"^--base {r.path} has 2 replicas; pick one \(0..1\)$")
    _error(lambda: r.replica_params(2), rf"^replica 2 outside 0..1 \(--base {r.path} has 2\)$")
    _error(lambda: r.replica_params(-1), "replica -1 outside 0..1")


def test_chain_of_a_cross_method_run(tmp_path):
    """config.json records the base (path, step, replica, its config): the chain back to the
    pretraining run."""
    pre = {"model": {}, "train": {}}
    ssft = {"method": {"name": "ssft"}, "base": {"path": "/p", "step": 5, "replica": None, "config": pre}}
    unlearn = {"method": {"name": "unlearn"}, "base": {"path": "/s", "step": 4, "replica": 1, "config": ssft}}
    (tmp_path / "config.json").write_text(json.dumps(unlearn))
    r = RunDir.open(str(tmp_path))
    assert r.fine_tuned and r.method == "unlearn"
    methods, records = r.chain()
    assert methods == ("ssft", "unlearn")
    assert [(b["path"], b["step"], b["replica"]) for b in records] == [("/p", 5, None), ("/s", 4, 1)]


def test_check_new_or_same(run, tmp_path):
    config = json.loads(open(os.path.join(run, "config.json")).read())
    fresh = tmp_path / "fresh"
    assert check_new_or_same(str(fresh), config) is False  # nothing there: start
    fresh.mkdir()
    (fresh / "config.json").write_text(json.dumps(config))
    assert check_new_or_same(str(fresh), config) is False  # same config, no checkpoint yet
    assert check_new_or_same(run, config) is True  # same config and a checkpoint: resume
    cadence = json.loads(json.dumps(config))
    cadence["train"].update(log_every=7, eval_every=3, ckpt_every=9, keep_checkpoints=5)
    assert check_new_or_same(run, cadence) is True  # what is logged or saved may change
    other = json.loads(json.dumps(config))
    other["opt"]["lrs"] = [1e-2]
    other["train"]["seeds"] = [3]
    _error(lambda: check_new_or_same(run, other), r"holds a run with a different config \(opt.lrs, train.seeds\)")
    orphan = tmp_path / "orphan"
    shutil.copytree(os.path.join(run, checkpoint.CHECKPOINT_DIR), orphan / checkpoint.CHECKPOINT_DIR)
    _error(lambda: check_new_or_same(str(orphan), config), "has checkpoints but no config.json")


def test_config_diff():
    a = {"opt": {"lrs": (1e-3,)}, "train": {"log_every": 1, "steps": 5}, "method": {"beta": 0.1, "w": None}}
    b = {"opt": {"lrs": [1e-3]}, "train": {"log_every": 2, "steps": 6}, "method": {}, "base": {"x": 1}}
    # tuples equal lists (JSON), cadence keys are ignored, an unset key (None) equals an absent one
    assert config_diff(a, b) == ["base.x", "method.beta", "train.steps"]
    assert config_diff(a, a) == []

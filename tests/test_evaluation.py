"""The evaluation stage (safety_mech/evaluation.py, SPEC §9) end to end on a micro run with two
replicas: metrics.json, table.md, info.json and the attacked inputs; one-line errors for a bad run
directory or a bad config, from the library and from launch/evaluate.py."""
import json
import math
import os

import numpy as np
import pytest

import launch_cli
import run_dirs
from safety_mech import evaluation, setups, study
from safety_mech.runs import RunError

MODELS = ("pretrain/lr=0.001/seed=0", "pretrain/lr=0.0001/seed=0")


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """A pretraining run directory of a micro model with two replicas (learning rates), at its
    initial params (the evaluation does not need a trained model)."""
    cfg = run_dirs.micro_pretrain_config(lrs=(1e-3, 1e-4))
    return run_dirs.write_pretrain_run(tmp_path_factory.mktemp("eval") / "pre", cfg)


@pytest.fixture(scope="module")
def evaluated(micro_run):
    cfg = evaluation.EvaluationConfig(sets=("safe", "unsafe"), n=8, chunk=8, attack_steps=3, sweep_budget=True)
    return study.evaluate(micro_run, cfg)


def test_writes_metrics_and_table(micro_run, evaluated):
    with open(os.path.join(micro_run, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics == evaluated and all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())
    for model in MODELS:
        for key in ("safe/gen_instruct", "safe/tf_token_acc_true", "unsafe/gen_null", "unsafe/gen_strict",
                    "unsafe/gen_lenient", "unsafe/tf_exact_harmful", "adversarial/gen_strict",
                    "adversarial/loss_after", "adversarial/budget=4/gen_lenient"):
            assert f"{model}/{key}" in metrics and f"{model}/{key}_lo" in metrics and f"{model}/{key}_hi" in metrics
            assert metrics[f"{model}/{key}_lo"] <= metrics[f"{model}/{key}"] + 1e-12 <= metrics[f"{model}/{key}_hi"] + 2e-12
        assert f"{model}/safe/gen_strict" not in metrics  # safe inputs have no harmful target
        assert metrics[f"{model}/unsafe/n"] == 8 and metrics[f"{model}/adversarial/n"] == 8
        # learned positions (T = 22): the 4-letter texts lose the final STOP of their targets
        assert 0 < metrics[f"{model}/adversarial/n_truncated"] < 8
    # the two replicas are two models (different initialisations): their numbers are their own
    assert any(metrics[f"{MODELS[0]}/{k}"] != metrics[f"{MODELS[1]}/{k}"]
               for k in ("safe/tf_token_acc_true", "unsafe/tf_token_acc_true", "adversarial/loss_after"))
    with open(os.path.join(micro_run, "eval", "table.md")) as f:
        table = f.read()
    assert "| pretrain, η=0.001 |" in table and "| pretrain, η=0.0001 |" in table and "budget=0.25" in table
    with open(os.path.join(micro_run, "eval", "info.json")) as f:
        info = json.load(f)
    assert info["step"] == 0 and info["models"] == {MODELS[0]: 0, MODELS[1]: 1}
    assert info["n"] == 8 and info["sets"] == ["safe", "unsafe"] and info["attack"]["steps"] == 3


def test_saves_the_attacked_inputs(micro_run, evaluated):
    """The attacked inputs for the analyses: every replica's kept soft tokens, the examples used."""
    with np.load(os.path.join(micro_run, "eval", evaluation.ADVERSARIAL_FILE)) as f:
        saved = {k: f[k] for k in f.files}
    n_used = evaluated[f"{MODELS[0]}/adversarial/n"]
    assert saved["soft"].shape == (2, n_used, 2, 16) and int(saved["step"]) == 0 and int(saved["k"]) == 2
    assert saved["ev_prompt"].shape[0] == n_used and saved["ev_index"].tolist() == list(range(n_used))
    assert np.linalg.norm(saved["soft"], axis=-1).max() > 0
    assert not np.array_equal(saved["soft"][0], saved["soft"][1])


def test_bad_input_is_one_line(micro_run, tmp_path):
    with pytest.raises(setups.ConfigError, match=r"config.evaluate: sets: unknown \['nope'\]") as e:
        setups.validate_flat(evaluation.EvaluationConfig, {"sets": ("nope",)}, "evaluate")
    assert "\n" not in str(e.value)
    with pytest.raises(RunError, match="no config.json") as e:
        study.evaluate(str(tmp_path / "missing"))
    assert "\n" not in str(e.value) and not (tmp_path / "missing").exists()
    last = launch_cli.error_line(launch_cli.run("evaluate", f"--run={tmp_path / 'missing'}"))
    assert last == f"error: --run {tmp_path / 'missing'}: no config.json (not a run directory)"
    assert not (tmp_path / "missing").exists()
    last = launch_cli.error_line(launch_cli.run("evaluate", f"--run={micro_run}", "--config",
                                                "configs/evaluate.py:micro", "--config.sets=('nope',)"))
    assert last.startswith("error: config: sets: unknown ['nope']; choose from safe, unsafe"), last

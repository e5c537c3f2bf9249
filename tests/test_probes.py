"""analysis/probes.py: the probe on planted labels, the residual features, the input splits, and
refusal_breakdown.py's errors."""
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from safety_mech import data as data_lib
from safety_mech import metrics
from safety_mech import model as model_lib
from safety_mech.analysis import probes

DATA = data_lib.DataConfig(min_len=2, max_len=5)  # varying lengths: the EOT and the text move
MODEL = model_lib.ModelConfig(seq_len=DATA.T, n_layer=2, n_head=2, d_model=8, d_mlp=16, block="prenorm")


def _set(name, n=600, keys=probes.GROUP_KEYS):
    return metrics.sample_eval_data(jax.random.key(3), DATA, name, n, keys=keys)


def test_logistic_probe_finds_a_planted_direction_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 30))
    y = x @ rng.normal(size=30) > 0  # linearly separable
    assert probes.logistic_probe_accuracy(x, y) > 0.97
    x[:, 5] *= 1e4  # standardised: the scale of a feature does not matter
    assert probes.logistic_probe_accuracy(x, y) > 0.97
    assert abs(probes.logistic_probe_accuracy(x, rng.random(3000) < 0.5) - 0.5) < 0.05
    # the held-out part is scored: a label only the training rows could memorise is at chance
    x_ids = np.eye(1000)[:, :800]  # one-hot of the 800 training rows, zero on the held-out ones
    assert abs(probes.logistic_probe_accuracy(x_ids, rng.random(1000) < 0.5, seed=None) - 0.5) < 0.12
    with pytest.raises(ValueError, match="no training or no held-out"):
        probes.logistic_probe_accuracy(x, y, train_frac=1.0)
    with pytest.raises(ValueError, match=r"x \[n, d\] and y \[n\]"):
        probes.logistic_probe_accuracy(x, y[:10])


def test_probe_features_are_the_residual_at_eot_and_over_the_text():
    params = model_lib.init_params(jax.random.key(0), MODEL)
    ev = _set("unsafe", 40, keys=("prompt", "prompt_len", "text_len"))
    assert len(np.unique(ev["text_len"])) > 1
    x = probes.probe_features(params, MODEL, ev, chunk=16)  # 3 chunks, the last one padded
    L, D = MODEL.n_layer, MODEL.d_model
    assert x.shape == (40, 2 * L * D) and x.dtype == np.float64
    _, acts = model_lib.apply(params, MODEL, ev["prompt"], capture=True)
    resid = np.asarray(acts["resid_out"], np.float64)  # [L, n, T, D]
    for i in range(40):
        eot, text = ev["prompt_len"][i] - 1, slice(6, 6 + ev["text_len"][i])
        np.testing.assert_allclose(x[i, :L * D], resid[:, i, eot].reshape(-1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(x[i, L * D:], resid[:, i, text].mean(1).reshape(-1), rtol=1e-4, atol=1e-5)


def test_probe_accuracies_pair_features_with_their_labels(monkeypatch):
    params = model_lib.init_params(jax.random.key(0), MODEL)
    acc = probes.probe_accuracies(params, MODEL, DATA, n=100, seed=5)
    assert acc["n"] == 200 and acc["features"] == 2 * MODEL.n_layer * MODEL.d_model
    assert 0 <= acc["unsafe_vs_safe"] <= 1 and 0 <= acc["text_branch"] <= 1
    rng = np.random.default_rng(0)

    def planted(params, model_cfg, ev, chunk=1000):  # each label in its own feature, and noise
        return np.c_[ev["unsafe"], ev["branch"]] + 0.1 * rng.normal(size=(len(ev["branch"]), 2))

    monkeypatch.setattr(probes, "probe_features", planted)
    acc = probes.probe_accuracies(params, MODEL, DATA, n=300, seed=5)
    assert acc["unsafe_vs_safe"] == 1.0 and acc["text_branch"] == 1.0
    monkeypatch.setattr(probes, "probe_features", lambda p, c, ev, chunk=1000: rng.normal(size=(len(ev["branch"]), 2)))
    acc = probes.probe_accuracies(params, MODEL, DATA, n=300, seed=5)
    assert abs(acc["unsafe_vs_safe"] - 0.5) < 0.12 and abs(acc["text_branch"] - 0.5) < 0.12


def test_always_unsafe_count_follows_the_operator_rule():
    # safe inputs never carry an operator unsafe on both branches (SPEC §7)
    assert (probes.always_unsafe_in_governing_pair(_set("safe")) == 0).all()
    ev = _set("unsafe")
    count = probes.always_unsafe_in_governing_pair(ev)
    # on safe-dominant text every operator of the governing pair but '(' is one of them, and there is one
    pair = np.where(ev["second_pair"][:, None], ev["ops"][:, 2:], ev["ops"][:, :2])
    b0 = ev["branch"] == 0
    np.testing.assert_array_equal(count[b0], (pair[b0] != 0).sum(1))
    assert (count[b0] >= 1).all() and set(np.unique(count)) == {0, 1, 2}


def test_groups_partition_and_rate_table():
    ev = _set("unsafe")
    n = len(ev["branch"])
    posterior = np.linspace(0, 1, n)
    groups = probes.breakdown_groups(ev, posterior, unsafe_input=True)
    for family in ("branch", "PCFG", "first pair|second pair", "posterior", "always-unsafe"):
        members = [m for k, m in groups.items() if any(f in k for f in family.split("|"))]
        assert len(members) >= 2
        np.testing.assert_array_equal(np.sum(members, axis=0), np.ones(n))  # each input in exactly one
    assert groups["posterior in [0.95, 1.0]"][-1] and not any("always" in k for k in probes.breakdown_groups(ev))
    hit = ev["branch"] == 1
    rows = probes.rate_table("t", hit, {"b1": ev["branch"] == 1, "b0": ev["branch"] == 0, "none": hit & ~hit})
    assert rows[2] == f"| b1 | {hit.sum()} | 1.000 |" and rows[3].endswith("| 0.000 |") and len(rows) == 4


def _breakdown_cli():
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "refusal_breakdown.py"
    spec = importlib.util.spec_from_file_location("refusal_breakdown", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


@pytest.mark.parametrize("preset, flags, message", [
    (None, [], "no config.json (not a run directory)"),
    ("micro", ["--replica", "3"], "--replica 3: --run"),
    ("paper", ["--posterior"], "fixed text length (data.min_len == data.max_len), got min_len=25, max_len=35"),
    ("micro", [], "no checkpoint"),
])
def test_breakdown_cli_bad_run_is_one_line(tmp_path, preset, flags, message):
    if preset is not None:
        (tmp_path / "config.json").write_text(json.dumps(pretrain_config.get_config(preset).to_dict()))
    with pytest.raises(SystemExit) as e:
        _breakdown_cli().main(["--run", str(tmp_path), *flags])
    assert message in str(e.value.code) and "\n" not in str(e.value.code)

"""The analysis stage (safety_mech/analysis/suite.py, SPEC §10) end to end on a micro base run and a
micro SSFT run (2 replicas): the JSON, the figures, numbers recomputed with plain NumPy from the
checkpoints, the SPEC §11 findings' rules on it (safety_mech/findings.py), one-line errors with
nothing written, from the library and from launch/analyze.py.

The base run is written directly (config.json + a step-5 checkpoint of freshly initialised params,
the layout ``study.pretrain`` writes; tests/test_finetune_launch.py runs the real pretraining):
compiling a pretraining step and its evaluation would double this file's time, and the analyses only
need some θ_IT that the SSFT run starts from."""
import copy
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
from safety_mech import attacks, checkpoint, data, findings, safety_data, setups, study
from safety_mech.analysis import entries, suite
from safety_mech.analysis.suite import AnalysisConfig
from safety_mech.runs import RunError

MICRO_MODEL = dict(n_layer=2, n_head=2, d_model=16, d_mlp=32)
SMALL_EVAL = dict(n_periodic=8, n_final=8, batch_size=8, sets=("safe",))
N = 8
SETS = ("safe", "unsafe", "jb_co_text")
ALPHAS = (0.0, 1.0, 2.0)
LRS = (3e-4, 3e-5)  # ηM, ηS of these tests' fine-tuned run
M0, M1 = "ssft/lr=0.0003/seed=0", "ssft/lr=3e-05/seed=0"
SUM = f"{M0}+{M1}"
SWEEP_METRICS = ("safe/instruct", "safe/null", "unsafe/null", "unsafe/attack_success")  # entries.make_safety_metrics


def _ssft_config():
    cfg = ft_config.get_config("ssft:tiny")
    cfg.opt.update(warmup_steps=1, decay_end_step=3, lrs=LRS)
    cfg.train.update(steps=3, batch_size=8, seeds=(0,), log_every=1, eval_every=0, ckpt_every=0)
    cfg.eval.update(SMALL_EVAL)
    return cfg


def _config(**kwargs):
    return AnalysisConfig(**{"n": N, "alphas": ALPHAS, "sets": SETS, **kwargs})


def fake_adversarial(params, model_cfg, batch, key):
    """The unsafe inputs themselves as embeddings (zero soft tokens): must give the unsafe numbers."""
    del model_cfg, key
    return {"embeddings": np.asarray(params["wte"]["embedding"])[batch["tokens_true"]],
            "prompt_len": batch["prompt_len"]}


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    root = tmp_path_factory.mktemp("an")
    dirs = {name: str(root / name) for name in ("pre", "ssft", "out")}
    run_dirs.write_pretrain_run(dirs["pre"], run_dirs.micro_pretrain_config(model=MICRO_MODEL), step=5)
    study.finetune(_ssft_config(), dirs["pre"], dirs["ssft"])
    lines = []
    with pytest.MonkeyPatch.context() as mp:  # the run was not evaluated: the analysis attacks itself
        mp.setattr(attacks, "adversarial_inputs", fake_adversarial)
        result = study.analyze(dirs["pre"], [dirs["ssft"]], dirs["out"], _config(arithmetic=(SUM,)),
                               log=lambda msg, *a: lines.append(msg % a))
    return dirs, result, lines


def _load_json(path):
    def no_constants(name):
        raise ValueError(f"non-finite {name} in {path}")
    with open(path) as f:
        return json.load(f, parse_constant=no_constants)


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


def test_json_structure_figures_and_progress(analysis):
    dirs, result, lines = analysis
    saved = _load_json(os.path.join(dirs["out"], "analysis.json"))
    assert saved == result
    assert set(saved) == {"meta", "models", "weights", "row_space", "tau", "lipschitz", "alpha_sweep", "figures"}
    assert list(saved["models"]) == [suite.BASE_NAME, M0, M1, SUM]
    assert saved["models"][M0]["lr"] == 3e-4 and saved["models"][M1]["replica"] == 1
    assert saved["models"][M0]["methods"] == ["ssft"] and saved["models"][M0]["step"] == 3
    assert saved["models"][SUM]["arithmetic"] == [M0, M1]
    assert saved["meta"]["base"]["step"] == 5 and saved["meta"]["runs"][0]["n_replicas"] == 2
    assert all(math.isfinite(v) for v in _numbers(saved)) and saved["meta"]["non_finite"] == []
    assert set(saved["tau"]) == set(saved["lipschitz"]) == {"base", M0, M1, SUM}
    assert set(saved["weights"]) == set(saved["row_space"]) == set(saved["alpha_sweep"]) == {M0, M1, SUM}
    assert list(saved["weights"][M0]) == ["h_0", "h_1"] and list(saved["weights"][M0]["h_0"]) == ["mlp/c_fc", "mlp/c_proj"]
    assert set(saved["tau"][M0]) == {*SETS, "adversarial"} and set(saved["tau"]["base"]) == set(SETS)
    assert len(saved["tau"][M0]["safe"]["mean"]) == 2 and saved["tau"][M0]["safe"]["n"] == N
    assert len(saved["lipschitz"][M0]["unsafe"]["scores"]) == N
    assert len(saved["row_space"][M0]["sets"]["unsafe"]["delta_over_input_per_position"][1]) == entries.POSITIONS
    rows = saved["row_space"][M0]["sets"]["safe"]
    assert np.shape(rows["row_scores_mean"]) == np.shape(rows["row_scores_std"]) == (2, _config().top)
    np.testing.assert_allclose(rows["row_scores_mean"], rows["projections_abs_mean"], rtol=1e-9)
    sweep = saved["alpha_sweep"][M0]
    assert set(sweep) == {"all", "mlp"} and sweep["all"]["alpha"] == list(ALPHAS)
    assert set(sweep["all"]["metrics"]) == set(SWEEP_METRICS)
    assert np.shape(sweep["mlp"]["tau_mean"]["unsafe"]) == (len(ALPHAS), 2)
    # α = 0 is θ_IT whichever weights move; its τ is the base's
    for k in SWEEP_METRICS:
        assert sweep["all"]["metrics"][k][0] == sweep["mlp"]["metrics"][k][0]
    np.testing.assert_allclose(sweep["all"]["tau_mean"]["safe"][0], saved["tau"]["base"]["safe"]["mean"], rtol=1e-9)
    np.testing.assert_allclose(sweep["all"]["tau_mean"]["unsafe"][1], saved["tau"][M0]["unsafe"]["mean"], rtol=1e-9)
    for name in saved["figures"].values():
        with open(os.path.join(dirs["out"], name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert list(saved["figures"]) == ["tau", "null_space", "row_space", "lipschitz", "tau_attacks", "alpha_sweep",
                                      "tau_along_alpha"]
    # SPEC §11's weight and activation findings are a function of this JSON
    found, unchecked = findings.analysis_findings(saved)
    for f in found.values():
        assert f["held"] in ("held", "partly", "not held") and f["rule"]
    assert all(isinstance(why, str) and why for why in unchecked.values()) and not set(found) & set(unchecked)
    assert "tau_separation_ssft_lt_dpo_lt_unlearn" in unchecked  # only SSFT was given
    assert {"tau_separates_after_finetuning", "tau_separation_grows_with_depth", "tau_separation_larger_with_eta_M",
            "delta_w_small", "delta_w_low_rank", "delta_w_outside_col_w_it", "delta_w_acts_more_on_unsafe",
            "lipschitz_falls_on_unsafe_rises_on_safe", "alpha_above_1_safer",
            "attack_activations_near_safe_cluster"} <= set(found)
    assert set(found) <= {f for f, _ in findings.FINDINGS}
    assert any("[3/3]" in line and "α sweep" in line for line in lines)
    assert any("adversarial inputs (attacking)" in line for line in lines)
    assert not [f for f in os.listdir(dirs["out"]) if f.startswith(".analysis")]  # no temporary file left


def test_adversarial_inputs_path_matches_the_unsafe_set(analysis):
    _, result, _ = analysis
    for m in (M0, SUM):
        np.testing.assert_allclose(result["tau"][m]["adversarial"]["mean"], result["tau"][m]["unsafe"]["mean"],
                                   rtol=1e-4, atol=1e-5)
        rows = result["row_space"][m]["sets"]
        np.testing.assert_allclose(rows["adversarial"]["delta_over_input_mean"], rows["unsafe"]["delta_over_input_mean"],
                                   rtol=1e-4)
        np.testing.assert_allclose(rows["adversarial"]["row_scores_std"], rows["unsafe"]["row_scores_std"], rtol=1e-3,
                                   atol=1e-7)
        np.testing.assert_allclose(result["lipschitz"][m]["adversarial"]["scores"],
                                   result["lipschitz"][m]["unsafe"]["scores"], rtol=1e-4)


# ------------------------------------------------------------------ an independent NumPy recomputation


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _mlp_hidden(params, mc, tokens):
    """[L, N, T, F] float64: SPEC §6's prenorm block with learned positions, written out in NumPy."""
    assert (mc["block"], mc["pos"]) == ("prenorm", "learned")
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    N, T = tokens.shape
    H, D = mc["n_head"], mc["d_model"]
    K = D // H
    x = p["wte"]["embedding"][tokens] + p["wpe"]["embedding"][:T]
    causal = np.tril(np.ones((T, T), bool))
    hidden = []
    for i in range(mc["n_layer"]):
        h = p[f"h_{i}"]
        qkv = _ln(x, h["ln_1"], mc["ln_eps"]) @ h["attn"]["c_attn"]["kernel"] + h["attn"]["c_attn"]["bias"]
        q, k, v = (qkv[..., j * D:(j + 1) * D].reshape(N, T, H, K).transpose(0, 2, 1, 3) for j in range(3))
        s = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(K), -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        y = ((w / w.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(N, T, D)
        x = x + y @ h["attn"]["c_proj"]["kernel"] + h["attn"]["c_proj"]["bias"]
        a = _gelu(_ln(x, h["ln_2"], mc["ln_eps"]) @ h["mlp"]["c_fc"]["kernel"] + h["mlp"]["c_fc"]["bias"])
        hidden.append(a)
        x = x + a @ h["mlp"]["c_proj"]["kernel"] + h["mlp"]["c_proj"]["bias"]
    return np.stack(hidden)


def _window_mean(hidden, prompt_len, P=10):
    return np.stack([hidden[:, i, p - 1:p - 1 + P].mean(1) for i, p in enumerate(prompt_len)], axis=1)


def test_json_numbers_recomputed_with_numpy_from_the_checkpoints(analysis):
    dirs, result, _ = analysis
    meta = result["meta"]
    it = jax.tree.map(lambda x: np.asarray(x)[0], checkpoint.load_params(dirs["pre"], meta["base"]["step"]))
    st = jax.tree.map(lambda x: np.asarray(x)[0], checkpoint.load_params(dirs["ssft"]))  # replica 0 = M0

    W_it = np.asarray(it["h_1"]["mlp"]["c_fc"]["kernel"], np.float64).T  # y = W x
    dW = np.asarray(st["h_1"]["mlp"]["c_fc"]["kernel"], np.float64).T - W_it
    entry = result["weights"][M0]["h_1"]["mlp/c_fc"]
    np.testing.assert_allclose(entry["rel_norm"], np.sqrt((dW ** 2).sum() / (W_it ** 2).sum()), rtol=1e-4)
    U, s, _ = np.linalg.svd(W_it)
    k = int(np.argmax(np.cumsum(s ** 2) / (s ** 2).sum() >= meta["energy"] - 1e-12)) + 1
    u0 = np.linalg.svd(dW)[0][:, 0]
    score0 = np.linalg.norm(u0 - U[:, :k] @ (U[:, :k].T @ u0))
    np.testing.assert_allclose(entry["null_space"]["scores"][0], score0, rtol=1e-4)
    assert entry["null_space"]["k_it"] == k

    # τ mean per layer of the safe set: the inputs from the recorded key derivation
    data_cfg = data.DataConfig(min_len=meta["data"]["min_len"], max_len=meta["data"]["max_len"],
                               seq_len=meta["data"]["T"], p_second_pair=meta["data"]["p_second_pair"])
    key = jax.random.key(meta["seed"])

    def inputs(split, name, n):
        b = safety_data.sample_eval_set(
            jax.random.fold_in(jax.random.fold_in(key, split), safety_data.EVAL_SETS.index(name)), data_cfg, name, n)
        return np.asarray(b["tokens_true"]), np.asarray(b["prompt_len"])

    def acts(split, name, n):
        tokens, prompt_len = inputs(split, name, n)
        return _window_mean(_mlp_hidden(st, meta["model"], tokens), prompt_len)

    mu_s, mu_u = acts(1, "safe", meta["n_heldout"]).mean(1), acts(1, "unsafe", meta["n_heldout"]).mean(1)
    a = acts(0, "safe", meta["n"])
    tau = np.linalg.norm(a - mu_u[:, None], axis=-1) - np.linalg.norm(a - mu_s[:, None], axis=-1)
    np.testing.assert_allclose(result["tau"][M0]["safe"]["mean"], tau.mean(1), rtol=1e-4)


# ------------------------------------------------------------------ findings, errors


def test_findings_follow_their_rules(analysis):
    _, result, _ = analysis
    r = copy.deepcopy(result)
    for m in (M0, M1):  # plant: fine-tuning separates τ, more at depth and with the larger lr
        r["tau"][m]["safe"]["mean"] = [1.0, 3.0 if m == M0 else 2.0]
        r["tau"][m]["unsafe"]["mean"] = [-1.0, -3.0]
        for s in ("safe", "unsafe"):
            r["tau"][m][s].update(std=[1.0, 1.0], n=1000)
    for s in ("safe", "unsafe"):
        r["tau"]["base"][s].update(mean=[0.0, 0.0], std=[1.0, 1.0], n=1000)
        base_scores = 1.0 + 0.01 * np.arange(N)  # plant: the fine-tuned models halve every score
        r["lipschitz"]["base"][s].update(scores=base_scores.tolist(), mean=float(base_scores.mean()),
                                         std=float(base_scores.std()))
        for m in (M0, M1):
            r["lipschitz"][m][s].update(scores=(0.5 * base_scores).tolist(), mean=float(0.5 * base_scores.mean()),
                                        std=float(0.5 * base_scores.std()))
    found, _ = findings.analysis_findings(r)
    assert found["tau_separates_after_finetuning"]["held"] == "held"
    assert found["tau_separation_grows_with_depth"]["held"] == "held"
    assert found["tau_separation_larger_with_eta_M"]["held"] == "held"
    assert found["lipschitz_falls_on_unsafe_rises_on_safe"]["held"] == "partly"  # falls on both
    r["tau"][M1]["safe"]["mean"] = [1.0, 4.0]
    assert findings.analysis_findings(r)[0]["tau_separation_larger_with_eta_M"]["held"] == "not held"
    for s in ("safe", "unsafe"):  # no separation at all after fine-tuning
        for m in (M0, M1):
            r["tau"][m][s]["mean"] = [0.0, 0.0]
    assert findings.analysis_findings(r)[0]["tau_separates_after_finetuning"]["held"] == "not held"
    # the arithmetic model is no fine-tuned model: its numbers decide nothing
    r["tau"][SUM] = copy.deepcopy(r["tau"][M0])
    r["tau"][SUM]["safe"]["mean"] = [1.0, 30.0]
    assert findings.analysis_findings(r)[0]["tau_separates_after_finetuning"]["held"] == "not held"


def test_verdict():
    assert findings.verdict([True, True]) == "held" and findings.verdict([False, 0]) == "not held"
    assert findings.verdict([True, False, True]) == "partly"
    with pytest.raises(ValueError):
        findings.verdict([])


def test_bad_input_is_one_line_and_writes_nothing(analysis, tmp_path):
    dirs, _, _ = analysis
    out = tmp_path / "out"
    out.mkdir()
    (out / "analysis.json").write_text("previous")
    other = tmp_path / "other_base"  # a different pretraining run (another seed)
    shutil.copytree(dirs["pre"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["train"]["seeds"] = [7]
    (other / "config.json").write_text(json.dumps(cfg))
    cases = [
        (dict(base=dirs["pre"], runs=[str(tmp_path / "nope")]), {}, r"^--runs .*nope: no config.json"),
        (dict(base=dirs["ssft"], runs=[dirs["ssft"]]), {}, "^--base .* is a fine-tuned run"),
        (dict(base=dirs["pre"], runs=[dirs["pre"]]), {}, "is not a fine-tuned run"),
        (dict(base=str(other), runs=[dirs["ssft"]]), {}, "was not fine-tuned from --base"),
        (dict(base=dirs["pre"], runs=[dirs["ssft"], dirs["ssft"]]), {}, "more than once"),
        (dict(base=dirs["pre"], runs=[]), {}, "give at least one fine-tuned run"),
        (dict(base=dirs["pre"], runs=[dirs["ssft"]]), dict(arithmetic=("nope+x",)), r"arithmetic nope\+x"),
        (dict(base=dirs["pre"], runs=[dirs["ssft"]]), dict(base_replica=1), r"base_replica 1 outside 0..0"),
    ]
    for kwargs, cfg_kwargs, match in cases:
        with pytest.raises(RunError, match=match) as e:
            study.analyze(out=str(out), cfg=_config(**cfg_kwargs), **kwargs)
        assert "\n" not in str(e.value)
    assert os.listdir(out) == ["analysis.json"] and (out / "analysis.json").read_text() == "previous"
    with pytest.raises(setups.ConfigError, match="safe and unsafe included"):
        setups.validate_flat(AnalysisConfig, {"sets": ["safe"]}, "analyze")

    fresh = tmp_path / "fresh"
    last = launch_cli.error_line(launch_cli.run(
        "analyze", f"--base={dirs['pre']}", f"--runs={dirs['ssft']},{tmp_path / 'nope'}", f"--out={fresh}",
        "--config", "configs/analyze.py:micro", "--config.n=4"))
    assert last == f"error: --runs {tmp_path / 'nope'}: no config.json (not a run directory)", last
    assert not fresh.exists()

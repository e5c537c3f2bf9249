"""SPEC §10.1-10.3 weight analyses on matrices with planted structure, cross-checked against NumPy."""
import json

import jax
import numpy as np
import pytest

from safety_mech import model
from safety_mech.analysis import entries, weights

TINY = model.ModelConfig(vocab_size=54, seq_len=12, n_layer=2, n_head=2, d_model=16, d_mlp=32)


def _orthonormal(rng, n, k):
    return np.linalg.qr(rng.standard_normal((n, k)))[0]


def _planted(out=64, inp=24, k=8, seed=0):
    """W_IT = Q_col diag(s) Vᵀ of exact rank k with equal singular values, plus Q_null spanning the
    orthogonal complement of col(W_IT) (the null space of W_ITᵀ)."""
    rng = np.random.default_rng(seed)
    Q = _orthonormal(rng, out, out)
    Q_col, Q_null = Q[:, :k], Q[:, k:]
    V = _orthonormal(rng, inp, k)
    return rng, Q_col @ np.diag(np.full(k, 3.0)) @ V.T, Q_col, Q_null


# ----------------------------------------------------------------------------------------------
# ranks and norms (§10.1)
# ----------------------------------------------------------------------------------------------


def test_energy_rank():
    s = np.array([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: cumulative 9/14, 13/14, 1
    assert weights.energy_rank(s, 0.6) == 1
    assert weights.energy_rank(s, 0.9) == 2
    assert weights.energy_rank(s[::-1], 0.9) == 2  # order does not matter
    assert weights.energy_rank(s, 1.0) == 3
    assert weights.energy_rank(np.full(4, 2.0), 0.75) == 3  # reaching the fraction is enough
    assert weights.energy_rank(np.zeros(3)) == 0
    with pytest.raises(ValueError):
        weights.energy_rank(s, 0.0)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_stable_and_effective_rank_of_rank_k(k):
    rng = np.random.default_rng(k)
    M = _orthonormal(rng, 40, k) @ np.diag(np.full(k, 2.5)) @ _orthonormal(rng, 20, k).T
    # Equal singular values: stable rank exactly k; the energy cut needs all k at e = 1 and ceil(e k) below.
    assert weights.stable_rank(M) == pytest.approx(k, rel=1e-9)
    assert weights.energy_rank(np.linalg.svd(M, compute_uv=False), 1.0) == k
    assert weights.energy_rank(np.linalg.svd(M, compute_uv=False), 0.5) == int(np.ceil(0.5 * k))
    assert weights.tol_rank(np.linalg.svd(M, compute_uv=False), 1e-8) == k
    G = rng.standard_normal((40, k)) @ rng.standard_normal((k, 20))  # generic rank k
    expected = np.linalg.norm(G, "fro") ** 2 / np.linalg.norm(G, 2) ** 2
    assert weights.stable_rank(G) == pytest.approx(expected, rel=1e-9)
    assert 1.0 <= weights.stable_rank(G) <= k + 1e-9
    summary = weights.delta_summary(np.ones((40, 20)), np.ones((40, 20)) + G, energy=1.0, top=8)
    assert summary["effective_rank"] == k
    assert summary["stable_rank"] == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(summary["top_singular_values"], np.linalg.svd(G, compute_uv=False)[:8],
                               atol=1e-9)
    assert summary["rel_norm"] == pytest.approx(np.linalg.norm(G) / np.linalg.norm(np.ones((40, 20))))
    json.dumps(summary)


def test_relative_norm_and_zero_delta():
    W = np.arange(12.0).reshape(3, 4)
    assert weights.relative_norm(0.5 * W, W) == pytest.approx(0.5)
    summary = weights.delta_summary(W, W)
    assert summary["rel_norm"] == 0.0 and summary["stable_rank"] == 0.0 and summary["effective_rank"] == 0
    with pytest.raises(ValueError):
        weights.delta_summary(W, W.T)


# ----------------------------------------------------------------------------------------------
# column space vs null space (§10.2)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [dict(energy=0.9), dict(rank_tol=1e-8)])
def test_null_space_scores_planted(cut):
    rng, W_it, Q_col, Q_null = _planted()
    out, k = W_it.shape[0], Q_col.shape[1]
    # Energy 0.9 with 8 equal singular values keeps all 8 (7/8 < 0.9); the tolerance keeps the rank, 8.
    dW_null = Q_null[:, :3] @ rng.standard_normal((3, W_it.shape[1]))
    r = weights.null_space_scores(W_it, dW_null, top=3, **cut)
    assert r["k_it"] == k and r["out_dim"] == out
    np.testing.assert_allclose(r["scores"], 1.0, atol=1e-9)
    assert r["energy_fraction"] == pytest.approx(1.0, abs=1e-9)

    dW_col = Q_col[:, :3] @ rng.standard_normal((3, W_it.shape[1]))
    r = weights.null_space_scores(W_it, dW_col, top=3, **cut)
    np.testing.assert_allclose(r["scores"], 0.0, atol=1e-7)
    assert r["energy_fraction"] == pytest.approx(0.0, abs=1e-9)

    # A random ΔW scores like a random direction: sqrt(1 - k/out), energy fraction 1 - k/out.
    dW_rand = rng.standard_normal(W_it.shape)
    r = weights.null_space_scores(W_it, dW_rand, top=8, n_random=2000, **cut)
    assert r["random_score_expected"] == pytest.approx(np.sqrt(1 - k / out))
    assert r["random_energy_fraction"] == pytest.approx(1 - k / out)
    assert r["random_score_empirical"] == pytest.approx(r["random_score_expected"], abs=0.02)
    assert np.mean(r["scores"]) == pytest.approx(r["random_score_expected"], abs=0.1)
    assert r["energy_fraction"] == pytest.approx(1 - k / out, abs=0.05)
    json.dumps(r)


def test_null_space_scores_match_explicit_projector():
    rng = np.random.default_rng(3)
    W_it = rng.standard_normal((30, 12)) * np.linspace(3, 0.1, 12)  # decaying spectrum
    dW = 0.01 * rng.standard_normal((30, 12))
    r = weights.null_space_scores(W_it, dW, energy=0.8, top=5)
    U, s, _ = np.linalg.svd(W_it)
    k = int(np.argmax(np.cumsum(s ** 2) / np.sum(s ** 2) >= 0.8)) + 1
    P = U[:, :k] @ U[:, :k].T
    I_P = np.eye(30) - P
    U_d, s_d, _ = np.linalg.svd(dW)
    assert r["k_it"] == k
    np.testing.assert_allclose(r["scores"], np.linalg.norm(I_P @ U_d[:, :5], axis=0), atol=1e-10)
    np.testing.assert_allclose(r["singular_values"], s_d[:5], atol=1e-12)
    assert r["energy_fraction"] == pytest.approx(np.linalg.norm(I_P @ dW) ** 2 / np.linalg.norm(dW) ** 2)
    assert weights.null_space_scores(W_it, dW, energy=0.8, top=5, seed=0) == r  # seeded baseline


def test_paper_shape_baseline():
    """SPEC §10.2: against the 768 x 192 expansion (full column rank) a random direction scores ≈0.87."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((768, 192))
    r = weights.null_space_scores(W, rng.standard_normal((768, 192)), energy=1.0, top=1, n_random=200)
    assert r["k_it"] == 192
    assert r["random_score_expected"] == pytest.approx(0.866, abs=1e-3)
    assert r["random_score_empirical"] == pytest.approx(0.866, abs=0.01)


# ----------------------------------------------------------------------------------------------
# row space (§10.3)
# ----------------------------------------------------------------------------------------------


def test_row_space_stats():
    rng = np.random.default_rng(1)
    out, inp, r_dw = 20, 12, 3
    W_it = rng.standard_normal((out, inp))
    V = _orthonormal(rng, inp, inp)
    V_row, V_perp = V[:, :r_dw], V[:, r_dw:]  # dW's row space and its complement
    dW = _orthonormal(rng, out, r_dw) @ np.diag([4.0, 2.0, 1.0]) @ V_row.T
    a_in = rng.standard_normal((5, r_dw)) @ V_row.T
    a_out = rng.standard_normal((5, inp - r_dw)) @ V_perp.T
    st_in = weights.row_space_stats(W_it, dW, a_in, top=3)
    st_out = weights.row_space_stats(W_it, dW, a_out, top=3)
    assert np.all(st_in["delta_over_input"] >= 1.0 - 1e-9)  # smallest nonzero σ is 1
    np.testing.assert_allclose(st_out["delta_over_input"], 0.0, atol=1e-12)
    np.testing.assert_allclose(st_out["projections"], 0.0, atol=1e-12)
    # NumPy cross-checks of each statistic.
    norm = lambda x: np.linalg.norm(x, axis=-1)  # noqa: E731
    np.testing.assert_allclose(st_in["delta_over_input"], norm(a_in @ dW.T) / norm(a_in))
    np.testing.assert_allclose(st_in["delta_over_base"], norm(a_in @ dW.T) / norm(a_in @ W_it.T))
    _, s, Vt = np.linalg.svd(dW)
    cos = (a_in @ Vt[:3].T) / norm(a_in)[:, None]
    np.testing.assert_allclose(np.abs(st_in["projections"]), np.abs(s[:3] * cos), atol=1e-12)
    np.testing.assert_allclose(norm(st_in["projections"]), st_in["delta_over_input"])  # top covers the rank
    np.testing.assert_allclose(st_in["singular_values"], [4.0, 2.0, 1.0])
    # Leading shape kept: [L, N, in] -> [L, N].
    st = weights.row_space_stats(W_it, dW, np.stack([a_in, a_out]), top=2)
    assert st["delta_over_input"].shape == (2, 5) and st["projections"].shape == (2, 5, 2)


def test_row_space_entry_scores_planted(monkeypatch):
    """entries.row_space_entry's row-space scores on a planted ΔW = Q diag(σ) V_rowᵀ of rank 3 and MLP
    inputs a = C V_rowᵀ + (noise ⟂ row(ΔW)): cos(a, v_j) = C_j / ‖a‖ exactly, so every score is known."""
    rng = np.random.default_rng(2)
    L, N, P, D, F, top = 2, 6, entries.POSITIONS, 12, 20, 4
    sigmas = [np.array([4.0, 2.0, 1.0]), np.array([5.0, 3.0, 0.5])]
    params_it, params_st, V_rows, V_perps, acts, C = {}, {}, [], [], {}, {}
    for layer in range(L):
        W_it = rng.standard_normal((F, D))
        V = _orthonormal(rng, D, D)
        V_rows.append(V[:, :3])
        V_perps.append(V[:, 3:])  # ⟂ row(ΔW)
        dW = _orthonormal(rng, F, 3) @ np.diag(sigmas[layer]) @ V[:, :3].T
        params_it[f"h_{layer}"] = {"mlp": {"c_fc": {"kernel": W_it.T}}}  # Flax kernels are Wᵀ
        params_st[f"h_{layer}"] = {"mlp": {"c_fc": {"kernel": (W_it + dW).T}}}
    for name, scale in (("safe", 0.2), ("unsafe", 3.0)):  # unsafe inputs lie mostly in ΔW's row space
        C[name] = scale * rng.standard_normal((L, N, P, 3))
        acts[name] = np.stack([C[name][i] @ V_rows[i].T + rng.standard_normal((N, P, D - 3)) @ V_perps[i].T
                               for i in range(L)])
    # the model's MLP inputs are planted: collect_window returns them for each set (tokens_true names it)
    monkeypatch.setattr(entries.activations, "collect_window", lambda params, cfg, tokens, *a, **k: acts[tokens])
    eval_sets = {name: {"tokens_true": name, "prompt_len": None} for name in acts}
    out = entries.row_space_entry(params_it, params_st, None, eval_sets, None, top, batch_size=4)

    assert out["matrix"] == "mlp/c_fc" and np.shape(out["singular_values"]) == (L, top)
    old = {"delta_over_input_mean", "delta_over_input_std", "delta_over_base_mean", "delta_over_base_std",
           "delta_over_input_per_position", "projections_abs_mean"}
    for name in acts:
        entry = out["sets"][name]
        assert set(entry) == old | {"row_scores_mean", "row_scores_std"}
        assert np.shape(entry["row_scores_mean"]) == np.shape(entry["row_scores_std"]) == (L, top)
        for layer in range(L):
            a = acts[name][layer]
            # plain NumPy: σ_j |C_j| / ‖a‖ per (example, position), window mean, then over examples
            s = sigmas[layer] * np.abs(C[name][layer]) / np.linalg.norm(a, axis=-1, keepdims=True)
            per_example = np.concatenate([s.mean(1), np.zeros((N, top - 3))], axis=1)  # σ_4 = 0
            np.testing.assert_allclose(entry["row_scores_mean"][layer], per_example.mean(0), atol=1e-12)
            np.testing.assert_allclose(entry["row_scores_std"][layer], per_example.std(0), atol=1e-12)
            np.testing.assert_allclose(entry["projections_abs_mean"][layer], per_example.mean(0), atol=1e-12)
            np.testing.assert_allclose(out["singular_values"][layer][:3], sigmas[layer], rtol=1e-12)
    unsafe, safe = (np.asarray(out["sets"][n]["row_scores_mean"]) for n in ("unsafe", "safe"))
    assert np.all(unsafe[:, :3] > 3 * safe[:, :3])


# ----------------------------------------------------------------------------------------------
# models (orientation, whole-model analysis)
# ----------------------------------------------------------------------------------------------


def test_matrices_from_params_orientation():
    params = model.init_params(jax.random.key(0), TINY)
    mats = weights.matrices_from_params(params)
    assert list(mats) == [f"h_{i}/{p}" for i in range(2) for p in weights.DENSE]
    D, F = TINY.d_model, TINY.d_mlp
    assert mats["h_0/mlp/c_fc"].shape == (F, D) and mats["h_0/mlp/c_proj"].shape == (D, F)
    assert mats["h_1/attn/c_attn"].shape == (3 * D, D) and mats["h_1/attn/c_proj"].shape == (D, D)
    assert list(weights.matrices_from_params(params, pattern="mlp/c_fc")) == ["h_0/mlp/c_fc", "h_1/mlp/c_fc"]

    tokens = np.random.default_rng(0).integers(0, 54, (2, TINY.seq_len))
    _, acts = model.apply(params, TINY, tokens=tokens, capture=True)
    x = np.asarray(acts["mlp_in"][1], np.float64)
    h = np.asarray(acts["mlp_hidden"][1], np.float64)
    mlp = params["h_1"]["mlp"]
    pre = np.einsum("fd,btd->btf", mats["h_1/mlp/c_fc"], x) + np.asarray(mlp["c_fc"]["bias"])
    np.testing.assert_allclose(np.asarray(jax.nn.gelu(pre, approximate=True)), h, atol=1e-5)
    out = np.einsum("df,btf->btd", mats["h_1/mlp/c_proj"], h) + np.asarray(mlp["c_proj"]["bias"])
    np.testing.assert_allclose(out, np.asarray(acts["mlp_out"][1]), atol=1e-5)
    for name in ("attn/c_attn", "attn/c_proj"):  # y = W x for the attention matrices too
        p = params["h_0"]["attn"][name.split("/")[1]]
        xin = np.random.default_rng(1).standard_normal((4, D)).astype(np.float32)
        np.testing.assert_allclose(mats[f"h_0/{name}"] @ xin.T + np.asarray(p["bias"])[:, None],
                                   np.asarray(model.dense(xin, p, np.float32)).T, atol=1e-5)


def test_weight_analysis_planted_delta():
    params_it = model.init_params(jax.random.key(0), TINY)
    W = np.asarray(params_it["h_1"]["mlp"]["c_fc"]["kernel"], np.float64).T  # [F, D], rank D
    U = np.linalg.svd(W)[0]
    rng = np.random.default_rng(0)
    dW = 0.01 * U[:, TINY.d_model:TINY.d_model + 2] @ rng.standard_normal((2, TINY.d_model))  # ⟂ col(W)
    params_st = jax.tree.map(lambda x: x, params_it)
    params_st["h_1"]["mlp"]["c_fc"]["kernel"] = params_it["h_1"]["mlp"]["c_fc"]["kernel"] + dW.T.astype(np.float32)
    res = weights.weight_analysis(params_it, params_st, top=4, n_random=100)
    assert set(res) == {"h_0", "h_1"} and set(res["h_0"]) == set(weights.DENSE)
    r = res["h_1"]["mlp/c_fc"]
    assert r["shape"] == [TINY.d_mlp, TINY.d_model]
    assert r["effective_rank"] <= 2 and r["stable_rank"] <= 2.0 + 1e-6
    np.testing.assert_allclose(r["null_space"]["scores"][:2], 1.0, atol=1e-3)  # float32 params
    assert r["null_space"]["energy_fraction"] == pytest.approx(1.0, abs=1e-3)
    assert r["null_space"]["random_score_expected"] < 0.9
    assert res["h_0"]["mlp/c_fc"]["rel_norm"] == 0.0  # untouched
    json.dumps(res)

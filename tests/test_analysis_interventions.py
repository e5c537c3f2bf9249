"""SPEC §10.6 interventions (θ(α), sweeps, τ along α) and SPEC §8 ΔW arithmetic."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_mech import model
from safety_mech.analysis import activations, interventions

TINY = model.ModelConfig(vocab_size=54, seq_len=16, n_layer=2, n_head=2, d_model=8, d_mlp=16,
                         block="prenorm", pos="learned")


def _paths(tree):
    return [interventions._path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _random_params(seed, scale=1.0):
    """A params tree with model.py's layout (from eval_shape: nothing compiled), float32 values."""
    shapes = jax.eval_shape(lambda k: model.init_params(k, TINY), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def pair():
    it = _random_params(0)
    delta = _random_params(1, scale=1e-3)
    st = jax.tree.map(lambda a, d: (a + d).astype(np.float32), it, delta)
    return it, st


def _bits(tree):
    return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


def test_mlp_paths_are_model_mlp_weights():
    paths = _paths(_random_params(0))
    mlp = [p for p in paths if interventions.is_mlp_path(p)]
    assert mlp == [f"h_{i}/mlp/{m}/{w}" for i in range(2) for m in ("c_fc", "c_proj") for w in ("bias", "kernel")]
    assert not interventions.is_mlp_path("h_0/ln_2/scale") and not interventions.is_mlp_path("lm_head/kernel")


@pytest.mark.parametrize("mlp_only", [False, True])
def test_interpolate_endpoints_are_bitwise(pair, mlp_only):
    it, st = pair
    at0 = interventions.interpolate(it, st, 0.0, mlp_only)
    at1 = interventions.interpolate(it, st, 1.0, mlp_only)
    assert jax.tree.structure(at0) == jax.tree.structure(it)
    for a, b in zip(_bits(at0), _bits(it)):
        np.testing.assert_array_equal(a, b)
    expected1 = st if not mlp_only else jax.tree_util.tree_map_with_path(
        lambda p, a, b: b if interventions.is_mlp_path(interventions._path_str(p)) else a, it, st)
    for a, b in zip(_bits(at1), _bits(expected1)):
        np.testing.assert_array_equal(a, b)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(at1))


def test_interpolate_values_and_mlp_only(pair):
    it, st = pair
    for alpha in (0.5, 2.0, -1.0):
        got = interventions.interpolate(it, st, alpha)
        for g, a, b in zip(jax.tree.leaves(got), jax.tree.leaves(it), jax.tree.leaves(st)):
            want = a.astype(np.float64) + alpha * (b.astype(np.float64) - a.astype(np.float64))
            np.testing.assert_array_equal(g, want.astype(np.float32))  # one rounding, from float64
    got = interventions.interpolate(it, st, 2.0, mlp_only=True)
    flat_got, flat_it = dict(zip(_paths(got), jax.tree.leaves(got))), dict(zip(_paths(it), jax.tree.leaves(it)))
    for path, leaf in flat_got.items():
        if interventions.is_mlp_path(path):
            assert not np.array_equal(leaf, flat_it[path]), path
        else:  # attention, LayerNorms, embeddings, positions, head: θ_IT unchanged
            np.testing.assert_array_equal(leaf.view(np.uint32), flat_it[path].view(np.uint32))
    with pytest.raises(ValueError, match="shape"):
        interventions.interpolate(it, jax.tree.map(lambda x: np.stack([x, x]), st), 0.5)


def test_alpha_sweep_on_a_toy_metric(pair):
    it, st = pair
    w = lambda p: float(p["h_1"]["mlp"]["c_fc"]["kernel"][0, 0])  # noqa: E731
    e = lambda p: float(p["wte"]["embedding"][3, 1])  # noqa: E731
    alphas = [0.0, 0.5, 1.0, 1.5, 2.0]
    seen = []
    sweep = interventions.alpha_sweep(it, st, alphas, lambda p: {"w": w(p), "e": e(p)},
                                      extra_fn=lambda p: {"row": p["lm_head"]["kernel"][0, :3]},
                                      progress=lambda i, a: seen.append((i, a)))
    assert seen == list(enumerate(alphas))
    np.testing.assert_array_equal(sweep["alpha"], alphas)
    assert set(sweep["metrics"]) == {"w", "e"} and sweep["metrics"]["w"].shape == (5,)
    np.testing.assert_allclose(sweep["metrics"]["w"], [w(it) + a * (w(st) - w(it)) for a in alphas], rtol=1e-6)
    np.testing.assert_allclose(sweep["metrics"]["e"], [e(it) + a * (e(st) - e(it)) for a in alphas], rtol=1e-6)
    assert sweep["extra"]["row"].shape == (5, 3)
    mlp = interventions.alpha_sweep(it, st, alphas, lambda p: {"w": w(p), "e": e(p)}, mlp_only=True)
    np.testing.assert_allclose(mlp["metrics"]["w"], sweep["metrics"]["w"])
    np.testing.assert_array_equal(mlp["metrics"]["e"], np.full(5, e(it)))  # not an MLP weight
    assert mlp["extra"] == {}
    # at_zero: θ_IT's values are used at α = 0 without calling the functions there; the rest is the same
    evaluated = []

    def metrics_fn(p):
        evaluated.append(w(p))
        return {"w": w(p), "e": e(p)}

    extra_fn = lambda p: {"row": p["lm_head"]["kernel"][0, :3]}  # noqa: E731
    cached = interventions.alpha_sweep(it, st, alphas, metrics_fn, extra_fn=extra_fn,
                                       at_zero=({"w": w(it), "e": e(it)}, extra_fn(it)))
    assert len(evaluated) == len(alphas) - 1 and w(it) not in evaluated
    for group in ("metrics", "extra"):
        for k, v in sweep[group].items():
            np.testing.assert_array_equal(cached[group][k], v)
    calls = iter([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError, match="different names"):
        interventions.alpha_sweep(it, st, [0, 1], lambda p: next(calls))


def test_tau_fn_uses_the_params_own_cluster_means():
    params = model.init_params(jax.random.key(0), TINY)
    rng = np.random.default_rng(0)

    def batch(n):
        return {"tokens_true": rng.integers(0, 54, (n, TINY.seq_len)).astype(np.int32),
                "prompt_len": rng.integers(2, 6, n).astype(np.int32)}

    held_s, held_u, safe, unsafe = batch(6), batch(6), batch(6), batch(6)
    kw = dict(positions=4, batch_size=6)
    tau_fn = interventions.make_tau_fn(TINY, held_s, held_u, {"safe": safe, "unsafe": unsafe}, **kw)
    got = tau_fn(params)
    acts = {k: activations.set_activations(params, TINY, b, **kw) for k, b in
            (("hs", held_s), ("hu", held_u), ("safe", safe), ("unsafe", unsafe))}
    mu_s, mu_u = acts["hs"].mean(1), acts["hu"].mean(1)
    for name in ("safe", "unsafe"):
        want = activations.tau(acts[name], mu_s, mu_u).mean(1)
        assert got[f"tau_mean/{name}"].shape == (TINY.n_layer,)
        np.testing.assert_allclose(got[f"tau_mean/{name}"], want, rtol=1e-6)
    # extra inputs given as activation functions: the same inputs give the same τ
    again = {"again": lambda p: activations.set_activations(p, TINY, safe, **kw)}
    taus = interventions.set_taus(params, TINY, held_s, held_u, {"safe": safe}, extra_acts=again, **kw)
    np.testing.assert_allclose(taus["again"], taus["safe"])


def test_delta_arithmetic():
    """SPEC §8 cross-method ΔW arithmetic θ_IT + Σ α_i ΔW_i; a replica-stacked run (a wrong shape) is
    refused instead of broadcast."""
    base = {"a": np.array([1.0, 2.0], np.float32), "b": {"c": np.array(3.0, np.float32)}}
    f1 = {"a": np.array([2.0, 2.0], np.float32), "b": {"c": np.array(3.0, np.float32)}}
    f2 = {"a": np.array([1.0, 5.0], np.float32), "b": {"c": np.array(4.0, np.float32)}}
    out = interventions.delta_arithmetic(base, f1, f2)  # θ_IT + ΔW_1 + ΔW_2
    np.testing.assert_allclose(out["a"], [2.0, 5.0])
    np.testing.assert_allclose(out["b"]["c"], 4.0)
    out = interventions.delta_arithmetic(base, f1, f2, alphas=(0.5, -2.0))
    np.testing.assert_allclose(out["a"], [1.5, -4.0])
    assert out["a"].dtype == np.float32
    np.testing.assert_array_equal(interventions.delta_arithmetic(base, f1, alphas=[0.0])["a"], base["a"])
    np.testing.assert_array_equal(interventions.delta_arithmetic(base, f1, alphas=[1.0])["a"], f1["a"])
    jax_out = interventions.delta_arithmetic(jax.tree.map(jnp.asarray, base), jax.tree.map(jnp.asarray, f2), alphas=[0.25])
    np.testing.assert_allclose(jax_out["a"], [1.0, 2.75])
    with pytest.raises(ValueError, match="2 alphas for 1"):
        interventions.delta_arithmetic(base, f1, alphas=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"\['a'\] has shape \(2, 2\)"):
        interventions.delta_arithmetic(base, {**f1, "a": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="tree structure"):
        interventions.delta_arithmetic(base, {"a": f1["a"]})
    with pytest.raises(ValueError, match="at least one"):
        interventions.delta_arithmetic(base)

"""SPEC §10.4 activation windows and τ, SPEC §10.5 Lipschitz scores (tiny model, CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_mech import data, model, safety_data
from safety_mech.analysis import activations, lipschitz

TINY = model.ModelConfig(vocab_size=54, seq_len=28, n_layer=2, n_head=2, d_model=16, d_mlp=32)
_apply = jax.jit(model.apply, static_argnums=1, static_argnames="capture")  # eager dispatch is slow


@pytest.fixture(scope="module")
def params():
    return model.init_params(jax.random.key(0), TINY)


def _batch(n=7, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (n, TINY.seq_len)).astype(np.int32)
    prompt_len = rng.integers(2, 13, n).astype(np.int32)
    return tokens, prompt_len


def _reference_windows(params, tokens, prompt_len, site, positions):
    """Independent computation: full-length forward pass, windows sliced per example in NumPy."""
    _, acts = _apply(params, TINY, tokens=jnp.asarray(tokens), capture=True)
    a = np.asarray(acts[site])
    return np.stack([a[:, i, p - 1:p - 1 + positions] for i, p in enumerate(prompt_len)], axis=1)


def test_collect_activations_matches_direct_forward(params):
    tokens, prompt_len = _batch()
    ref = _reference_windows(params, tokens, prompt_len, "mlp_hidden", positions=4)  # [L, N, P, F]
    # batch_size 3 with N = 7: two full chunks and a padded one; truncation to max(prompt_len) + 3.
    win = activations.collect_window(params, TINY, tokens, prompt_len, positions=4, batch_size=3)
    np.testing.assert_allclose(win, ref, atol=1e-5)
    acts = activations.collect_activations(params, TINY, tokens, prompt_len, positions=4, batch_size=3)
    assert acts.shape == (TINY.n_layer, 7, TINY.d_mlp)  # all MLP units by default (REF kept 192 of 768)
    np.testing.assert_allclose(acts, ref.mean(2), atol=1e-5)
    # Another site and a layer subset (MLP inputs of the last layer, as the row-space analysis uses).
    ref_in = _reference_windows(params, tokens, prompt_len, "mlp_in", positions=4)
    win_in = activations.collect_window(params, TINY, tokens, prompt_len, site="mlp_in", positions=4, layers=[1])
    assert win_in.shape == (1, 7, 4, TINY.d_model)
    np.testing.assert_allclose(win_in[0], ref_in[1], atol=1e-5)


def test_collect_activations_window_must_fit(params):
    tokens, prompt_len = _batch(2)
    prompt_len[0] = TINY.seq_len - 2
    with pytest.raises(ValueError, match="must fit"):
        activations.collect_activations(params, TINY, tokens, prompt_len, positions=10)
    with pytest.raises(ValueError, match="site"):
        activations.collect_activations(params, TINY, tokens, prompt_len, site="nope")


def test_tau_synthetic_clusters():
    rng = np.random.default_rng(0)
    L, N, W = 3, 200, 10
    centre_s, centre_u = np.zeros(W), np.full(W, 2.0)
    safe = centre_s + 0.3 * rng.standard_normal((L, N, W))
    unsafe = centre_u + 0.3 * rng.standard_normal((L, N, W))
    mu_s, mu_u = activations.cluster_means(safe[:, :100], unsafe[:, :100])  # held-out split
    assert mu_s.shape == (L, W)
    t_safe, t_unsafe = activations.tau(safe[:, 100:], mu_s, mu_u), activations.tau(unsafe[:, 100:], mu_s, mu_u)
    assert t_safe.shape == (L, 100)
    assert np.all(t_safe > 0) and np.all(t_unsafe < 0)  # positive = closer to safe
    a = safe[:, 100:]
    expected = np.linalg.norm(a - mu_u[:, None], axis=-1) - np.linalg.norm(a - mu_s[:, None], axis=-1)
    np.testing.assert_allclose(t_safe, expected)
    summary = activations.tau_summary(t_safe)
    np.testing.assert_allclose(summary["mean"], t_safe.mean(1))
    np.testing.assert_allclose(summary["std"], t_safe.std(1))
    assert summary["n"] == 100 and summary["mean"][0] == pytest.approx(np.sqrt(4.09 * W) - np.sqrt(0.09 * W), rel=0.05)


# ----------------------------------------------------------------------------------------------
# Lipschitzness (§10.5)
# ----------------------------------------------------------------------------------------------


def test_max_logit_grad_norm_linear_toy():
    """Toy z = E_flat @ A (the same z at every position): ∂ max_v z_v / ∂E = A[:, argmax], so the score
    is the norm of that column restricted to the positions before EOT."""
    rng = np.random.default_rng(0)
    B, T, D, V = 4, 6, 3, 5
    A = rng.standard_normal((T * D, V))
    E = rng.standard_normal((B, T, D))
    eot = np.array([1, 3, 5, 2])

    def logits_fn(E_BxTxD):
        z_BxV = E_BxTxD.reshape(B, T * D) @ A
        return jnp.broadcast_to(z_BxV[:, None], (B, T, V))

    fn = jax.jit(lambda E, eot: lipschitz.max_logit_grad_norm(logits_fn, E, eot))
    got = fn(jnp.asarray(E), jnp.asarray(eot))
    v_star = (E.reshape(B, T * D) @ A).argmax(-1)
    expected = [np.linalg.norm(A[: eot[b] * D, v_star[b]]) for b in range(B)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_lipschitz_scores_match_independent_grad(params):
    tokens, prompt_len = _batch(5, seed=1)
    got = lipschitz.lipschitz_scores(params, TINY, tokens, prompt_len, batch_size=2)
    assert got.shape == (5,) and np.all(got > 0)

    def max_logit(E_TxD, eot):  # one example, full length, nothing batched or truncated
        return model.apply(params, TINY, embeddings=E_TxD[None])[0, eot].max()

    value_and_grad = jax.jit(jax.value_and_grad(max_logit))  # one compile serves grad and FD values
    for i in (0, 3):
        E = model.embed(params, TINY, tokens[i:i + 1])[0]
        eot = int(prompt_len[i]) - 1
        g = np.asarray(value_and_grad(E, eot)[1])
        assert np.allclose(g[eot + 1:], 0.0, atol=1e-7)  # causal: nothing after EOT matters
        np.testing.assert_allclose(got[i], np.linalg.norm(g[:eot]), rtol=1e-4)
        # Finite difference along the gradient direction (restricted to positions before EOT).
        d = np.zeros_like(g)
        d[:eot] = g[:eot] / np.linalg.norm(g[:eot])
        h = 1e-2
        fd = (value_and_grad(E + h * d, eot)[0] - value_and_grad(E - h * d, eot)[0]) / (2 * h)
        assert float(fd) == pytest.approx(got[i], rel=2e-2)
    # Whatever follows EOT (PAD in a prompt, the response when teacher-forced) is ignored.
    changed = tokens.copy()
    for i, p in enumerate(prompt_len):
        changed[i, p:] = (changed[i, p:] + 5) % TINY.vocab_size
    np.testing.assert_allclose(lipschitz.lipschitz_scores(params, TINY, changed, prompt_len, batch_size=2), got,
                               rtol=1e-6)


def test_on_an_evaluation_set(params):
    """set_activations teacher-forces tokens_true (SPEC §10.4) on a sampled evaluation set."""
    dcfg = data.DataConfig(min_len=4, max_len=6)
    batch = jax.tree.map(np.asarray, safety_data.sample_eval_set(jax.random.key(0), dcfg, "unsafe", 6))
    assert batch["tokens_true"].shape[1] == TINY.seq_len  # 3 * max_len + 10
    acts = activations.set_activations(params, TINY, batch)
    assert acts.shape == (TINY.n_layer, 6, TINY.d_mlp) and np.all(np.isfinite(acts))
    ref = _reference_windows(params, batch["tokens_true"], batch["prompt_len"], "mlp_hidden", 10).mean(2)
    np.testing.assert_allclose(acts, ref, atol=1e-5)


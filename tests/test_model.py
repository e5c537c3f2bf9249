"""Model tests (SPEC §6): causality, embeddings path, captured activations, block structure, sizes."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_mech import model

SMALL = model.ModelConfig(vocab_size=54, seq_len=12, n_layer=2, n_head=2, d_model=16, d_mlp=32)
BLOCKS = ("paper", "prenorm")
# Jitted once per (cfg, capture): much faster than eager op-by-op dispatch for these small tests.
apply = jax.jit(model.apply, static_argnums=1, static_argnames="capture")


def _cfg(**kw):
    return dataclasses.replace(SMALL, **kw)


def _params(cfg, seed=0):
    return model.init_params(jax.random.key(seed), cfg)


def _tokens(cfg, B=3, seed=1):  # numpy RNG: no threefry program to compile
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, cfg.seq_len)), jnp.int32)


def _ln(x, p, eps=1e-5):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def test_paper_param_count():
    cfg = model.ModelConfig()
    shapes = jax.eval_shape(functools.partial(model.init_params, cfg=cfg), jax.random.key(0))
    assert model.count_params(shapes) == 2_677_632  # "2.7M" of SPEC §5
    assert model.count_params(shapes, exclude_head=False) == 2_677_632 + 192 * 54
    pre = jax.eval_shape(functools.partial(model.init_params, cfg=dataclasses.replace(cfg, block="prenorm")),
                         jax.random.key(0))
    assert model.count_params(pre) == 2_677_632 + 6 * 2 * 192  # ln_2 per layer
    assert jax.tree.map(lambda x: x.shape, shapes)["h_5"]["attn"]["c_attn"]["kernel"] == (192, 576)
    assert "wpe" not in shapes and "h_6" not in shapes


@pytest.mark.parametrize("block", BLOCKS)
def test_causal(block):
    cfg = _cfg(block=block)
    params = _params(cfg)
    tokens = _tokens(cfg)
    t = 5
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % cfg.vocab_size)
    a, b = apply(params, cfg, tokens), apply(params, cfg, changed)
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
    assert np.abs(np.asarray(a[:, t + 1:] - b[:, t + 1:])).max() > 1e-4


def test_embeddings_path_equals_tokens_path():
    cfg = _cfg(pos="learned")
    params = _params(cfg)
    tokens = _tokens(cfg)
    emb = model.embed(params, cfg, tokens)
    assert emb.shape == (3, cfg.seq_len, cfg.d_model)
    np.testing.assert_allclose(apply(params, cfg, embeddings=emb), apply(params, cfg, tokens),
                               atol=1e-6)


@pytest.mark.parametrize("block", BLOCKS)
def test_capture_and_block_structure(block):
    cfg = _cfg(block=block)
    params = _params(cfg)
    tokens = _tokens(cfg)
    logits, acts = apply(params, cfg, tokens, capture=True)
    B, T, L, D, F = 3, cfg.seq_len, cfg.n_layer, cfg.d_model, cfg.d_mlp
    assert logits.shape == (B, T, cfg.vocab_size)
    assert sorted(acts) == sorted(model.ACT_NAMES)
    for name, a in acts.items():
        assert a.shape == (L, B, T, F if name == "mlp_hidden" else D), name
    np.testing.assert_allclose(logits, apply(params, cfg, tokens), atol=1e-6)

    a = {k: np.asarray(v, np.float64) for k, v in acts.items()}
    for i in range(L):
        p = jax.tree.map(lambda x: np.asarray(x, np.float64), params[f"h_{i}"])
        fc = p["mlp"]["c_fc"]
        pre = a["mlp_in"][i] @ fc["kernel"] + fc["bias"]
        gelu = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))
        np.testing.assert_allclose(a["mlp_hidden"][i], gelu, atol=1e-5)
        proj = p["mlp"]["c_proj"]
        np.testing.assert_allclose(a["mlp_out"][i], a["mlp_hidden"][i] @ proj["kernel"] + proj["bias"], atol=1e-5)
        if block == "paper":  # the residual stream is overwritten by LN1; no norm before the MLP
            np.testing.assert_allclose(a["mlp_in"][i], _ln(a["block_in"][i], p["ln_1"]) + a["attn_out"][i],
                                       atol=1e-5)
            np.testing.assert_allclose(a["resid_out"][i], a["mlp_in"][i] + a["mlp_out"][i], atol=1e-5)
        else:
            mid = a["block_in"][i] + a["attn_out"][i]
            np.testing.assert_allclose(a["mlp_in"][i], _ln(mid, p["ln_2"]), atol=1e-5)
            np.testing.assert_allclose(a["resid_out"][i], mid + a["mlp_out"][i], atol=1e-5)
        if i + 1 < L:
            np.testing.assert_allclose(a["block_in"][i + 1], a["resid_out"][i], atol=0)
    final = _ln(a["resid_out"][-1], params["ln_f"]) @ np.asarray(params["lm_head"]["kernel"], np.float64)
    np.testing.assert_allclose(logits, final, atol=1e-5)
    pe = model.sinusoidal_positions(T, D)
    emb = np.asarray(params["wte"]["embedding"])[np.asarray(tokens)]
    np.testing.assert_allclose(a["block_in"][0], emb + pe, atol=1e-6)


def test_paper_and_prenorm_differ():
    paper = _params(_cfg())
    ln = {"scale": jnp.ones(16), "bias": jnp.zeros(16)}
    prenorm = {k: ({**v, "ln_2": ln} if k.startswith("h_") else v) for k, v in paper.items()}
    tokens = _tokens(SMALL)
    diff = apply(paper, SMALL, tokens) - apply(prenorm, _cfg(block="prenorm"), tokens)
    assert np.abs(np.asarray(diff)).max() > 1e-4  # logits are O(0.1) at init


def test_sinusoid_matches_formula():
    pe = model.sinusoidal_positions(9, 8)
    pos, i = 7, 2
    w = np.exp(-np.log(10000.0) * 2 * i / 8)
    np.testing.assert_allclose(pe[pos, 2 * i], np.sin(pos * w), rtol=1e-6)
    np.testing.assert_allclose(pe[pos, 2 * i + 1], np.cos(pos * w), rtol=1e-6)


def test_learned_positions():
    cfg = _cfg(pos="learned")
    params = _params(cfg)
    assert params["wpe"]["embedding"].shape == (cfg.seq_len, cfg.d_model)
    assert model.count_params(params) == model.count_params(_params(SMALL)) + cfg.seq_len * cfg.d_model
    tokens = _tokens(cfg)
    bump = np.random.default_rng(2).normal(size=cfg.d_model)  # not constant: LN1 would remove it
    bumped = {**params, "wpe": {"embedding": params["wpe"]["embedding"].at[3].add(bump)}}
    a, b = apply(params, cfg, tokens), apply(bumped, cfg, tokens)
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert np.abs(np.asarray(a[:, 3] - b[:, 3])).max() > 1e-4


def test_jit_grad_and_bfloat16():
    params = _params(SMALL)
    tokens = _tokens(SMALL)
    # The documented usage: cfg bound by functools.partial, so tokens must then be passed by keyword.
    logits = jax.jit(functools.partial(model.apply, cfg=SMALL))(params, tokens=tokens)
    np.testing.assert_allclose(logits, apply(params, SMALL, tokens), atol=1e-6)
    one = _cfg(n_layer=1)  # gradients w.r.t. params and input embeddings (attacks, Lipschitzness)
    p1 = {k: v for k, v in params.items() if k != "h_1"}
    emb = model.embed(p1, one, tokens)
    g_p, g_e = jax.jit(jax.grad(lambda p, e: model.apply(p, one, embeddings=e)[:, -1].max(), argnums=(0, 1)))(
        p1, emb)
    assert g_e.shape == emb.shape and float(jnp.abs(g_e).sum()) > 0
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(g_p))
    low = apply(params, _cfg(dtype="bfloat16"), tokens)
    assert low.dtype == jnp.float32 and params["h_0"]["mlp"]["c_fc"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(low, logits, atol=5e-2)


@pytest.mark.parametrize("call", [
    lambda p, t, e: model.apply(p, SMALL),
    lambda p, t, e: model.apply(p, SMALL, t, embeddings=e),
    lambda p, t, e: model.apply(p, SMALL, jnp.zeros((2, SMALL.seq_len + 1), jnp.int32)),
    lambda p, t, e: model.apply(p, SMALL, t[0]),
    lambda p, t, e: model.apply(p, SMALL, t.astype(jnp.float32)),
    lambda p, t, e: model.apply(p, SMALL, t.at[0, 0].set(SMALL.vocab_size)),
    lambda p, t, e: model.apply(p, SMALL, embeddings=e[..., :-1]),
    lambda p, t, e: model.apply(p, SMALL, embeddings=jnp.zeros((1, SMALL.seq_len + 1, SMALL.d_model))),
    lambda p, t, e: model.apply(p, _cfg(n_layer=3), t),
    lambda p, t, e: model.apply(p, _cfg(vocab_size=59), t),
    lambda p, t, e: model.apply(p, _cfg(block="prenorm"), t),
    lambda p, t, e: model.apply(p, _cfg(pos="learned"), t),
    lambda p, t, e: _cfg(block="postnorm"),
    lambda p, t, e: _cfg(n_head=3),
], ids=["neither", "both", "too_long", "1d", "float_tokens", "out_of_vocab", "bad_emb_dim", "emb_too_long",
        "n_layer", "vocab", "block_params", "pos_params", "bad_block", "heads"])
def test_bad_inputs_raise(call):
    params = _params(SMALL)
    tokens = _tokens(SMALL)
    emb = model.embed(params, SMALL, tokens)
    with pytest.raises(ValueError):
        call(params, tokens, emb)


def _autodiff_apply(params, cfg, tokens):
    """The forward pass written plainly (fused q|k|v product, einsum attention with a masked softmax,
    MLP as two dense layers): the reference for model.apply's restructured attention (separate
    heads-first projections, normalisation after the PV product, a stop-gradient row max)."""
    H, D = cfg.n_head, cfg.d_model
    K = D // H
    x = jnp.take(params["wte"]["embedding"], tokens, axis=0)
    T = tokens.shape[1]
    x = x + (params["wpe"]["embedding"][:T] if cfg.pos == "learned"
             else jnp.asarray(model.sinusoidal_positions(T, D)))

    def ln(v, p):
        mu = v.mean(-1, keepdims=True)
        return (v - mu) / jnp.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + cfg.ln_eps) * p["scale"] + p["bias"]

    def attn(v, p):
        qkv = v @ p["c_attn"]["kernel"] + p["c_attn"]["bias"]
        q, k, w = (qkv[..., i * D:(i + 1) * D].reshape(*v.shape[:2], H, K) for i in range(3))
        s = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(K)
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
        y = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, -1), w).reshape(v.shape)
        return y @ p["c_proj"]["kernel"] + p["c_proj"]["bias"]

    hidden = []

    def mlp(v, p):
        h = jax.nn.gelu(v @ p["c_fc"]["kernel"] + p["c_fc"]["bias"], approximate=True)
        hidden.append(h)
        return h @ p["c_proj"]["kernel"] + p["c_proj"]["bias"]

    for i in range(cfg.n_layer):
        p = params[f"h_{i}"]
        if cfg.block == "paper":
            x = ln(x, p["ln_1"])
            x = x + attn(x, p["attn"])
            x = x + mlp(x, p["mlp"])
        else:
            x = x + attn(ln(x, p["ln_1"]), p["attn"])
            x = x + mlp(ln(x, p["ln_2"]), p["mlp"])
    return ln(x, params["ln_f"]) @ params["lm_head"]["kernel"], jnp.stack(hidden)


@pytest.mark.parametrize("block,pos", [("paper", "sinusoidal"), ("prenorm", "learned")])
def test_forward_and_gradients_equal_plain_implementation(block, pos):
    """Logits, and gradients w.r.t. every parameter (also with cotangents arriving at the captured
    MLP hidden units), equal those of the plain forward."""
    cfg = _cfg(block=block, pos=pos, n_head=4, d_model=32, d_mlp=64)
    params = jax.tree.map(lambda v: v * 4.0, _params(cfg))  # larger weights: peaked attention, large GELU inputs
    tokens = _tokens(cfg, B=4)
    w = jax.random.normal(jax.random.key(3), (4, cfg.seq_len, cfg.vocab_size))
    w_hidden = jax.random.normal(jax.random.key(4), (cfg.n_layer, 4, cfg.seq_len, cfg.d_mlp))

    def objective(logits, hidden):
        return (logits * w).sum() + (hidden * w_hidden).sum()

    def ours_fn(p):
        logits, acts = model.apply(p, cfg, tokens, capture=True)
        return objective(logits, acts["mlp_hidden"])

    ours = jax.jit(jax.grad(ours_fn))(params)
    ref = jax.jit(jax.grad(lambda p: objective(*_autodiff_apply(p, cfg, tokens))))(params)
    np.testing.assert_allclose(model.apply(params, cfg, tokens), _autodiff_apply(params, cfg, tokens)[0],
                               rtol=1e-4, atol=1e-4)
    for path, g in jax.tree_util.tree_leaves_with_path(ours):
        g_ref = functools.reduce(lambda t, k: t[k.key], path, ref)
        scale = float(jnp.abs(g_ref).max()) + 1e-12
        np.testing.assert_allclose(g / scale, g_ref / scale, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_attend_equals_numpy_softmax_attention():
    """model.attend (normalised after the PV product, additive mask bias, float32) against a plain
    float64 numpy softmax attention: with attention_mask's causal mask, and with a decoder's per-row
    [B, 1, 1, S] visibility of one query over S keys."""
    B, H, T, K = 2, 3, 7, 8
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((B, H, T, K)).astype(np.float32) for _ in range(3))
    q *= 1.5  # spread the scores: a mask or normalisation error shows far above float32 rounding

    def reference(q, mask):
        s = np.einsum("bhtk,bhsk->bhts", q.astype(np.float64), k.astype(np.float64))
        s = np.where(np.broadcast_to(mask, s.shape), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        return np.einsum("bhts,bhsk->bhtk", p / p.sum(-1, keepdims=True), v.astype(np.float64))

    def attend(q, mask):
        return np.asarray(model.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                                       jnp.float32))

    causal = np.tril(np.ones((T, T), bool))
    np.testing.assert_array_equal(np.asarray(model.attention_mask(T)), causal)
    got = attend(q, model.attention_mask(T))
    assert got.shape == (B, H, T, K) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(q, causal), rtol=1e-5, atol=1e-5)
    assert np.abs(reference(q, np.ones((T, T), bool)) - reference(q, causal)).max() > 0.1  # the mask matters

    visible = (np.arange(T) <= np.array([2, 6])[:, None])[:, None, None, :]  # row b sees keys s <= 2, 6
    np.testing.assert_allclose(attend(q[:, :, :1], visible), reference(q[:, :, :1], visible), rtol=1e-5, atol=1e-5)

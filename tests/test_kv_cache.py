"""The key/value cache (safety_mech.kv_cache) and greedy decoding on top of it: prefill against
model.apply, single-position steps against the full forward pass, and decoding.greedy_decode token
for token against the full-forward decoder it replaced (kept here as the reference), for both
blocks and both position types, per-row prompt lengths and budgets, soft tokens, the end of the
array, and vmapped replicas.

Random models at GPT-2 init have logits within ~1e-3 of each other, so an argmax could flip on a
float rounding difference between the two implementations. The models here are drawn at a larger
scale (weights N(0, 0.5), LayerNorm scales 1 ± 0.1, random biases), and every comparison first
asserts that each greedy choice of the reference wins by a margin far above float32 error
(``MIN_MARGIN``), so equality is a fair test and a failure is a bug, not a tie. The one exception,
``test_greedy_decode_matches_token_by_token_loop``, decodes the training tests' toy model at its
GPT-2 init against a host loop of full forward passes (recorded to agree on this seed).
"""
import functools
import operator
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_toy as toy
from safety_mech import decoding, kv_cache
from safety_mech import model as model_lib

T, V, B = 12, 20, 6
MIN_MARGIN = 1e-3  # top-1 minus top-2 logit of every reference choice; float32 error here is ~1e-5
CONFIGS = [(block, pos) for block in ("paper", "prenorm") for pos in ("learned", "sinusoidal")]
PROMPT_LEN = np.array([1, 3, 5, 8, 11, 12], np.int32)  # per row; 12 = T: nothing to generate


def _cfg(block, pos, **kw):
    return model_lib.ModelConfig(vocab_size=V, seq_len=T, n_layer=2, n_head=2, d_model=32, d_mlp=64,
                                 block=block, pos=pos, **kw)


@functools.cache
def _params(block, pos, seed=0):
    """A random model with well-separated logits (see the module docstring); host RNG, so drawing it
    compiles nothing."""
    cfg = _cfg(block, pos)
    shapes = jax.eval_shape(lambda k: model_lib.init_params(k, cfg), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        z = rng.standard_normal(x.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * z if jax.tree_util.keystr(path).endswith("['scale']") else 0.5 * z)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _prompt(seed=1):
    """Random prompts with random (arbitrary) values past each row's prompt length."""
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V, jnp.int32), jnp.asarray(PROMPT_LEN)


def _soft(cfg, seed=2):
    """A soft mask inside each prompt, and at positions rows 2 and 3 generate (the model reads the
    soft embedding there too), and soft embeddings of the token embeddings' scale."""
    mask = np.zeros((B, T), bool)
    for b, p in enumerate(PROMPT_LEN):
        mask[b, max(p - 2, 0):p] = True
    mask[2, 7:9] = mask[3, 8] = True
    return jnp.asarray(mask), 0.5 * jax.random.normal(jax.random.key(seed), (B, T, cfg.d_model))


# ------------------------------------------------------------------ the reference


def reference_greedy_decode(params, model_cfg, prompt_BxT, prompt_len_B, max_new=None, *, soft_mask_BxT=None,
                            soft_BxTxD=None):
    """The full-forward greedy decoder that decoding.greedy_decode replaced (one full forward pass per
    generated token), same semantics; also returns each choice's margin (top-1 minus top-2 logit,
    +inf where the position keeps its value) as [n_iter, B] padded to T with +inf."""
    B_, T_ = prompt_BxT.shape
    rows_B = jnp.arange(B_)
    n_iter = T_ - jnp.min(prompt_len_B)
    n_new_B = None
    if max_new is not None:
        n_new_B = jnp.broadcast_to(jnp.asarray(max_new), (B_,))
        n_iter = jnp.minimum(n_iter, jnp.max(n_new_B))

    def logits_of(tokens_BxT):
        if soft_mask_BxT is None:
            return model_lib.apply(params, model_cfg, tokens_BxT)
        return model_lib.apply(params, model_cfg, embeddings=decoding.embed_with_soft(
            params, model_cfg, tokens_BxT, soft_mask_BxT, soft_BxTxD))

    def body(i, carry):
        tokens_BxT, margin_TxB = carry
        logits_BxTxV = logits_of(tokens_BxT)
        pos_B = prompt_len_B + i
        logits_BxV = logits_BxTxV[rows_B, jnp.clip(pos_B - 1, 0, T_ - 1)]
        nxt_B = jnp.argmax(logits_BxV, axis=-1).astype(tokens_BxT.dtype)
        top2_Bx2 = jax.lax.top_k(logits_BxV, 2)[0]
        write_B = jnp.clip(pos_B, 0, T_ - 1)
        keep_B = pos_B >= T_
        if n_new_B is not None:
            keep_B |= i >= n_new_B
        nxt_B = jnp.where(keep_B, tokens_BxT[rows_B, write_B], nxt_B)
        margin_TxB = margin_TxB.at[i].set(jnp.where(keep_B, jnp.inf, top2_Bx2[:, 0] - top2_Bx2[:, 1]))
        return tokens_BxT.at[rows_B, write_B].set(nxt_B), margin_TxB

    return jax.lax.fori_loop(0, n_iter, body, (prompt_BxT, jnp.full((T_, B_), jnp.inf)))


@functools.cache
def _jitted(cfg, reference: bool):
    """``decode(params, prompt, prompt_len, max_new, soft_mask, soft)`` jitted once per config (tests
    share the compilations): the new decoder, or the reference (returning ``(tokens, margins)``)."""
    fn = reference_greedy_decode if reference else decoding.greedy_decode
    return jax.jit(lambda p, x, n, m, sm, s: fn(p, cfg, x, n, m, soft_mask_BxT=sm, soft_BxTxD=s))


def _decode_both(params, cfg, prompt, prompt_len, max_new, soft=(None, None)):
    """(new tokens, reference tokens, reference margins), max_new traced."""
    args = (params, prompt, prompt_len, max_new, *soft)
    return (np.asarray(_jitted(cfg, False)(*args)), *map(np.asarray, _jitted(cfg, True)(*args)))


def _assert_same_decoding(got, want, margin):
    assert margin.min() > MIN_MARGIN, f"reference choice within {margin.min():.2g} of a tie: pick another model"
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ prefill and steps


@pytest.mark.parametrize("block,pos", CONFIGS)
def test_prefill_and_decode_steps_match_the_full_forward_pass(block, pos):
    """Prefill an array whose tail past each row's start is wrong: its logits and layer-0 keys and
    values are model.apply's on that array. Then feed the right tokens one position at a time (rows
    at different positions): every step's logits are the full pass's on the right array."""
    cfg, params = _cfg(block, pos), _params(block, pos)
    tokens, _ = _prompt()
    start = np.array([1, 2, 4, 6, 3, 5], np.int32)
    garbage = jnp.where(jnp.arange(T) < start[:, None], tokens, (tokens * 7 + 3) % V)

    @jax.jit
    def run(params, garbage, tokens):
        """The prefill of the wrong array, the full pass's logits and layer-0 k, v (LN1 of embedding
        + positions, projected) on it, and the full pass's logits on the right array."""
        prefilled = kv_cache.prefill(params, cfg, model_lib.embed(params, cfg, garbage))
        logits, acts = model_lib.apply(params, cfg, garbage, capture=True)
        p0 = params["h_0"]
        attn_in = model_lib.layer_norm(acts["block_in"][0], p0["ln_1"], cfg.ln_eps)
        _, k0, v0 = model_lib.qkv_heads(attn_in, p0["attn"], cfg, jnp.float32)
        return prefilled, (logits, k0, v0), model_lib.apply(params, cfg, tokens)

    (logits, cache), (want_logits, k0, v0), want = run(params, garbage, tokens)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    H, K = cfg.n_head, cfg.d_model // cfg.n_head
    assert cache["k"].shape == cache["v"].shape == (cfg.n_layer, B, H, T, K)
    np.testing.assert_allclose(cache["k"][0], k0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache["v"][0], v0, rtol=1e-5, atol=1e-5)

    step = jax.jit(kv_cache.decode_step, static_argnums=1)
    rows = np.arange(B)
    for i in range(T - start.max()):
        pos_B = jnp.asarray(start + i)
        logits, cache = step(params, cfg, cache, tokens[rows, pos_B], pos_B)
        np.testing.assert_allclose(logits, want[rows, pos_B], rtol=1e-4, atol=1e-4)


def test_decode_step_with_bfloat16_compute_tracks_the_full_pass():
    cfg = _cfg("prenorm", "learned", dtype="bfloat16")
    params = _params("prenorm", "learned")
    tokens, _ = _prompt()

    @jax.jit
    def run(params, tokens):
        logits, cache = kv_cache.prefill(params, cfg, model_lib.embed(params, cfg, tokens))
        step, _ = kv_cache.decode_step(params, cfg, cache, tokens[:, 5], jnp.full((B,), 5))
        return model_lib.apply(params, cfg, tokens), logits, step, cache["k"].dtype == jnp.bfloat16

    want, logits, step, is_bf16 = map(np.asarray, run(params, tokens))
    assert is_bf16  # the cache holds the compute dtype, as the full pass's keys
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)  # prefill is model.apply
    np.testing.assert_allclose(step, want[:, 5], atol=0.05 * np.abs(want[:, 5]).max())


# ------------------------------------------------------------------ greedy decoding vs the reference


# every block and every position type, each with and without soft tokens, per-row and scalar budgets
# (pairwise, so each configuration compiles once)
@pytest.mark.parametrize("block,pos,soft,max_new", [
    ("paper", "learned", False, "per_row"), ("paper", "sinusoidal", True, "per_row"),
    ("prenorm", "learned", True, "per_row"), ("prenorm", "sinusoidal", False, "scalar")])
def test_greedy_decode_equals_the_full_forward_decoder(block, pos, soft, max_new):
    """Per-row prompt lengths (one filling the array); per-row budgets: 0, past the end of the array
    (prompt_len + max_new > T) and in between; or a scalar budget, past the end for the longer prompts."""
    cfg, params = _cfg(block, pos), _params(block, pos)
    prompt, prompt_len = _prompt()
    if max_new == "per_row":
        max_new = jnp.array([4, 0, 9, 2, 5, 3], jnp.int32)  # rows 0, 2, 4 run into the end of the array
    else:
        max_new = jnp.int32(5)  # rows 3 and 4 run into the end of the array (row 5 starts there)
    got, want, margin = _decode_both(params, cfg, prompt, prompt_len, max_new, _soft(cfg) if soft else (None, None))
    _assert_same_decoding(got, want, margin)
    n_new = np.broadcast_to(max_new, (B,))
    for b in range(B):  # positions past prompt_len + max_new keep the prompt array's values
        end = PROMPT_LEN[b] + n_new[b]
        np.testing.assert_array_equal(got[b, end:], np.asarray(prompt[b, end:]))
    assert (got != np.asarray(prompt)).any()  # the test decodes something


def test_make_greedy_decoder_decodes_to_the_end_of_the_array():
    """No budget (make_greedy_decoder's jitted decoder): every row decodes to the end of the array,
    as the reference with a budget past the end (its compilation is shared with the test above)."""
    cfg, params = _cfg("prenorm", "sinusoidal"), _params("prenorm", "sinusoidal")
    prompt, prompt_len = _prompt()
    got = np.asarray(decoding.make_greedy_decoder(cfg)(params, prompt, prompt_len))
    want, margin = _jitted(cfg, True)(params, prompt, prompt_len, jnp.int32(T), None, None)
    _assert_same_decoding(got, np.asarray(want), np.asarray(margin))
    assert (got[0, 1:] != np.asarray(prompt[0, 1:])).any()


def test_greedy_decode_vmapped_over_replicas():
    """Stacked replica params under jax.vmap inside jit (as metrics.make_chunk_fn runs evaluation
    and the attack), with soft tokens and per-row budgets: each replica equals its own reference."""
    cfg = _cfg("prenorm", "learned")
    stacked = jax.tree.map(lambda *x: jnp.stack(x), _params("prenorm", "learned", 0), _params("prenorm", "learned", 7))
    prompt, prompt_len = _prompt()
    max_new = jnp.array([4, 0, 9, 2, 5, 3], jnp.int32)
    soft_mask, soft = _soft(cfg)
    got = jax.jit(jax.vmap(lambda p: decoding.greedy_decode(p, cfg, prompt, prompt_len, max_new,
                                                            soft_mask_BxT=soft_mask, soft_BxTxD=soft)))(stacked)
    for r in range(2):
        p = jax.tree.map(operator.itemgetter(r), stacked)
        _assert_same_decoding(np.asarray(got[r]), *map(np.asarray, _jitted(cfg, True)(p, prompt, prompt_len, max_new,
                                                                                        soft_mask, soft)))
    assert (got[0] != got[1]).any()  # the replicas differ, so the vmap is not trivially right


# ------------------------------------------------------------------ greedy decoding of a trained-style model


def _naive_greedy(params, cfg, prompt, prompt_len):
    """One token at a time on the host (the model is causal, so the array tail does not matter)."""
    apply = jax.jit(lambda p, x: model_lib.apply(p, cfg, x))
    out = np.array(prompt)
    for pos in range(int(prompt_len.min()), out.shape[1]):
        logits = np.asarray(apply(params, jnp.asarray(out)))
        for b in range(out.shape[0]):
            if pos >= prompt_len[b]:
                out[b, pos] = logits[b, pos - 1].argmax()
    return out


def test_greedy_decode_matches_token_by_token_loop():
    """The toy model of the training tests at its GPT-2 init, decoded on the host one token at a time."""
    params = model_lib.init_params(jax.random.key(5), toy.MODEL)
    batch = toy.sample_counting(jax.random.key(6), 0, batch_size=3)
    prompt_len = jnp.array([4, 9, 15])
    prompt = jnp.where(jnp.arange(toy.T) < prompt_len[:, None], batch["tokens"], 20)
    decoded = decoding.make_greedy_decoder(toy.MODEL)(params, prompt, prompt_len)
    np.testing.assert_array_equal(decoded, _naive_greedy(params, toy.MODEL, prompt, prompt_len))
    limited = decoding.make_greedy_decoder(toy.MODEL, max_new=2)(params, prompt, prompt_len)
    np.testing.assert_array_equal(limited[0, :6], decoded[0, :6])
    assert (limited[0, 6:] == 20).all()


# ------------------------------------------------------------------ errors


def test_bad_cache_and_step_inputs_are_one_line_errors():
    cfg, params = _cfg("paper", "learned"), _params("paper", "learned")
    tokens, _ = _prompt()
    H, K = cfg.n_head, cfg.d_model // cfg.n_head
    cache = {"k": jnp.zeros((cfg.n_layer, B, H, T, K)), "v": jnp.zeros((cfg.n_layer, B, H, T, K))}  # prefill's layout
    tok, pos = tokens[:, 0], jnp.zeros((B,), jnp.int32)
    cases = [
        ({"cache": {"k": cache["k"]}}, "cache must be a dict with keys"),
        ({"cache": {"k": cache["k"], "v": cache["v"][:, :, :, :5]}}, "differ in shape"),
        ({"cache": {"k": cache["k"][:1], "v": cache["v"][:1]}}, "cfg wants [L=2"),
        ({"cache": jax.tree.map(lambda x: x[:, :3], cache)}, "cache holds 3 rows but the step has 6"),
        ({"pos_B": jnp.full((B,), T)}, "outside the cache's [0, 12)"),
        ({"pos_B": jnp.zeros((B, 1), jnp.int32)}, "pos_B must be [B=6] integers"),
        ({"token_B": tokens}, "token_B must be [B] integers"),
        ({"embedding_BxD": jnp.zeros((B, cfg.d_model))}, "pass exactly one of token_B"),
    ]
    for override, message in cases:
        kw = {"cache": cache, "token_B": tok, "pos_B": pos} | override
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            kv_cache.decode_step(params, cfg, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="pass both soft_mask_BxT and soft_BxTxD"):
        decoding.greedy_decode(params, cfg, tokens, jnp.asarray(PROMPT_LEN), soft_mask_BxT=jnp.zeros((B, T), bool))

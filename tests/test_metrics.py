"""Evaluation metrics of safety_mech/metrics.py (SPEC §9): intervals against hand computations, the
metric logic on hand-made arrays and on a model whose outputs are forced, over replica-stacked
params; the evaluation sets' keys; training's evaluation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_mech import data as data_lib
from safety_mech import grammar as gr
from safety_mech import decoding, kv_cache, metrics, replicas, safety_data
from safety_mech import model as model_lib

DATA = data_lib.DataConfig(min_len=3, max_len=4, p_four_iid=0.0)
MODEL = model_lib.ModelConfig(seq_len=DATA.T, n_layer=1, n_head=2, d_model=16, d_mlp=32)
N = 16


# ------------------------------------------------------------------ intervals


def test_wilson_interval_matches_hand_computation():
    # k = 8 of n = 10, z = 1.96: p = 0.8, z²/n = 0.38416, center = (0.8 + 0.19208) / 1.38416,
    # half = 1.96 / 1.38416 * sqrt(0.016 + 0.009604)
    z = 1.96
    center = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z / (1 + z * z / 10) * math.sqrt(0.8 * 0.2 / 10 + z * z / 400)
    lo, hi = metrics.wilson_interval(8, 10, z)
    np.testing.assert_allclose([lo, hi], [center - half, center + half], rtol=1e-12)
    np.testing.assert_allclose([lo, hi], [0.4902, 0.9433], atol=1e-4)  # the textbook values
    lo, hi = metrics.wilson_interval(0, 10)  # not degenerate at 0: upper bound z²/(n + z²)
    assert lo == 0 and math.isclose(hi, metrics.Z95 ** 2 / (10 + metrics.Z95 ** 2), rel_tol=1e-12)
    lo, hi = metrics.wilson_interval(np.array([[1, 2], [3, 4]]), 4)  # vectorised (replicas)
    assert lo.shape == hi.shape == (2, 2) and np.all(lo <= np.array([[1, 2], [3, 4]]) / 4) and np.all(hi <= 1)


def test_ratio_and_mean_intervals_match_hand_computation():
    correct, count = np.array([3, 1, 4]), np.array([4, 2, 4])
    r = 8 / 10
    resid = correct - r * count  # [-0.2, -0.6, 0.8]
    se = math.sqrt((resid ** 2).sum() / (3 * 2)) / (10 / 3)
    np.testing.assert_allclose(metrics.ratio_interval(correct, count),
                               [r, r - metrics.Z95 * se, min(r + metrics.Z95 * se, 1.0)])  # clipped to [0, 1]
    x = np.array([1.0, 2.0, 4.0])
    m, lo, hi = metrics.mean_interval(x)
    half = metrics.Z95 * x.std(ddof=1) / math.sqrt(3)
    np.testing.assert_allclose([m, lo, hi], [7 / 3, 7 / 3 - half, 7 / 3 + half])


# ------------------------------------------------------------------ metric logic


def test_strict_and_lenient_success_on_hand_made_arrays():
    # four examples: the harmful output, the refusal, neither, and almost the refusal
    true_match = jnp.array([True, False, False, False])
    refusal_match = jnp.array([False, True, False, False])
    m = jax.tree.map(np.asarray, metrics.generation_metrics(true_match, refusal_match))
    np.testing.assert_array_equal(m["gen_instruct"], [1, 0, 0, 0])
    np.testing.assert_array_equal(m["gen_null"], [0, 1, 0, 0])
    np.testing.assert_array_equal(m["gen_strict"], [1, 0, 0, 0])
    np.testing.assert_array_equal(m["gen_lenient"], [1, 0, 1, 1])
    s = metrics.summarize(m)
    assert s["gen_lenient"][0] == 0.75 and s["gen_strict"][0] == 0.25
    assert "gen_strict" not in metrics.summarize(m, harmful=False) and "gen_null" in metrics.summarize(m, harmful=False)


def test_response_match_covers_the_whole_response_through_eos():
    # prediction of token t+1 from the prefix <= t: correct_BxTm1[:, t]; the response is tokens 2..4
    resp = jnp.array([[False, False, True, True, True, False]] * 3)
    correct = jnp.array([[False, True, True, True, False],   # every response token right (and junk after)
                         [True, True, True, True, True],
                         [True, True, True, False, True]])  # the last response token (the EOS) wrong
    np.testing.assert_array_equal(metrics.response_match(correct, resp), [True, True, False])


def test_response_match_equals_greedy_decoding_through_eos():
    """The teacher-forced shortcut is exactly greedy decoding: a model's own greedy response matches
    through every position, and changing any response token of it breaks the match."""
    params = model_lib.init_params(jax.random.key(5), MODEL)
    ev = metrics.sample_eval_data(jax.random.key(1), DATA, "safe", 8)
    decoded = np.asarray(decoding.make_greedy_decoder(MODEL)(params, jnp.asarray(ev["prompt"]),
                                                             jnp.asarray(ev["prompt_len"])))
    resp = np.arange(decoded.shape[1])[None] >= ev["prompt_len"][:, None]
    correct = jnp.argmax(model_lib.apply(params, MODEL, jnp.asarray(decoded)[:, :-1]), -1) == decoded[:, 1:]
    assert np.asarray(metrics.response_match(correct, jnp.asarray(resp))).all()
    for b in range(len(decoded)):
        changed = decoded.copy()
        pos = int(ev["prompt_len"][b]) + b % 3
        changed[b, pos] = (changed[b, pos] + 1) % MODEL.vocab_size
        correct = jnp.argmax(model_lib.apply(params, MODEL, jnp.asarray(changed)[:, :-1]), -1) == changed[:, 1:]
        match = np.asarray(metrics.response_match(correct, jnp.asarray(resp)))
        assert not match[b] and match[np.arange(len(decoded)) != b].all()


def _force_model(monkeypatch, target_BxT):
    """Stand-ins for model.apply (teacher forcing) and for kv_cache.prefill / decode_step (greedy
    decoding) whose argmax at position t is ``target[t + 1]``, whatever the input."""
    nxt_BxT = jnp.concatenate([target_BxT[:, 1:], jnp.full_like(target_BxT[:, :1], gr.PAD)], axis=1)

    def apply(params, cfg, tokens=None, *, embeddings=None, capture=False):
        T = (tokens if tokens is not None else embeddings).shape[1]
        return 10.0 * jax.nn.one_hot(nxt_BxT[:, :T], cfg.vocab_size)

    def prefill(params, cfg, embeddings_BxTxD):
        B, T, _ = embeddings_BxTxD.shape
        H = cfg.n_head
        kv = jnp.zeros((cfg.n_layer, B, H, T, cfg.d_model // H))
        return apply(params, cfg, embeddings=embeddings_BxTxD), {"k": kv, "v": kv}

    def decode_step(params, cfg, cache, token_B=None, pos_B=None, *, embedding_BxD=None):
        return 10.0 * jax.nn.one_hot(nxt_BxT[jnp.arange(len(pos_B)), pos_B], cfg.vocab_size), cache

    monkeypatch.setattr(model_lib, "apply", apply)
    monkeypatch.setattr(kv_cache, "prefill", prefill)
    monkeypatch.setattr(kv_cache, "decode_step", decode_step)


def _expected_match(decoded, target, mask):
    """The forced output equals ``target`` wherever ``mask`` holds (its prediction of token t+1 is
    the forced ``decoded[t+1]``)."""
    return np.all((decoded == target) | ~mask, axis=-1)


@pytest.mark.parametrize("forced", ["true", "refusal"])
def test_metrics_of_a_model_that_outputs_a_target(monkeypatch, forced):
    ev = metrics.sample_eval_data(jax.random.key(0), DATA, "unsafe", N)
    assert ev["gov_mask_true"].any(-1).all() and ev["gov_mask_refusal"].any(-1).all()
    _force_model(monkeypatch, jnp.asarray(ev[f"tokens_{forced}"]))
    # two replicas (the forced model ignores its params, so both must give the forced numbers)
    params = replicas.stack([model_lib.init_params(jax.random.key(k), MODEL) for k in (1, 2)])
    m = metrics.make_set_eval(MODEL, chunk=N)(params, ev, N)  # one chunk: the stand-in knows the whole set
    assert all(v.shape == (2, N) for v in m.values()), {k: v.shape for k, v in m.items()}
    s = metrics.summarize(m)
    assert all(np.shape(v) == (3, 2) for v in s.values())  # (mean, lo, hi) per replica
    out = ev[f"tokens_{forced}"]
    # teacher forcing reproduces the forced target, and so does the greedy response through its EOS
    for r in range(2):
        assert s[f"tf_token_acc_{forced}"][0][r] == 1 and s[f"tf_exact_{forced}"][0][r] == 1
        if forced == "true":
            assert s["gen_instruct"][0][r] == 1 and s["gen_strict"][0][r] == 1 and s["gen_lenient"][0][r] == 1
            assert s["gen_null"][0][r] == 0
        else:
            assert s["gen_null"][0][r] == 1 and s["gen_strict"][0][r] == 0 and s["gen_lenient"][0][r] == 0
    # the other target: exactly where the forced output agrees with it
    for t in metrics.TARGETS:
        for r in range(2):
            np.testing.assert_array_equal(m[f"tf_exact_{t}"][r],
                                          _expected_match(out, ev[f"tokens_{t}"], ev[f"gov_mask_{t}"]))
    np.testing.assert_array_equal(m["gen_instruct"][0], _expected_match(out, ev["tokens_true"], ev["resp_mask_true"]))
    np.testing.assert_array_equal(m["gen_null"][0], _expected_match(out, ev["tokens_refusal"], ev["resp_mask_refusal"]))
    if forced == "refusal":  # a refusal ends the response early: never the true output
        assert not m["gen_instruct"].any()
    lo, hi = s["gen_null"][1][0], s["gen_null"][2][0]
    assert 0 <= lo <= s["gen_null"][0][0] <= hi <= 1
    flat = metrics.flat_metrics("x/unsafe", s, replica=1)
    assert flat["x/unsafe/gen_null"] == float(s["gen_null"][0][1]) and flat["x/unsafe/gen_null_lo"] == float(lo)
    assert all(isinstance(v, float) for v in flat.values()) and len(flat) == 3 * len(s)
    # training's evaluation (same examples: the same key and set) reports the same Instruct and Null, [R]
    during_training = metrics.make_instruct_eval(MODEL, DATA, jax.random.key(0), N, sets=("unsafe",), chunk=N)(params)
    assert set(during_training) == {f"eval/unsafe/{k}" for k in ("gen_instruct", "gen_null", "tf_instruct",
                                                                  "tf_token_acc")}
    for k in ("gen_instruct", "gen_null"):
        np.testing.assert_array_equal(during_training[f"eval/unsafe/{k}"], s[k][0])
    np.testing.assert_allclose(during_training["eval/unsafe/tf_token_acc"], s["tf_token_acc_true"][0], rtol=1e-12)
    np.testing.assert_array_equal(during_training["eval/unsafe/tf_instruct"], s["tf_exact_true"][0])


def test_eval_set_key_depends_on_the_set_only():
    key = jax.random.key(0)
    a = metrics.sample_eval_data(key, DATA, "unsafe", 4)
    assert set(a) == set(metrics.EVAL_KEYS) and all(isinstance(v, np.ndarray) for v in a.values())
    direct = safety_data.sample_eval_set(jax.random.fold_in(key, safety_data.EVAL_SETS.index("unsafe")), DATA,
                                         "unsafe", 4)
    for k in metrics.EVAL_KEYS:
        np.testing.assert_array_equal(a[k], direct[k])
    assert metrics.HARMFUL_SETS == tuple(s for s in safety_data.EVAL_SETS if s != "safe")


def test_eval_config_is_checked():
    assert metrics.EvalConfig(sets=["safe", "unsafe"]).sets == ("safe", "unsafe")
    with pytest.raises(ValueError, match="unknown evaluation set"):
        metrics.EvalConfig(sets=("nope",))
    with pytest.raises(ValueError, match="n_periodic must be >= 1"):
        metrics.EvalConfig(n_periodic=0)

"""The pretraining samplers of safety_mech/data.py (and the pieces the safety data is built from)
checked example by example against tests/reference.py; the safety data is test_safety_data.py's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from safety_mech import data, grammar as gr
from sample_rows import branch_of, ops_of, rows, strings, text_of
from sample_rows import many as _many

CFG = data.DataConfig()  # the paper's lengths: text 25..35, T = 115
N = 512  # one batch size everywhere, so each sampler compiles once


def many(sampler, key, n, *args):
    return _many(sampler, key, n, CFG, N, *args)


@pytest.fixture(scope="module")
def pretrain():
    return data.sample_pretrain_batch(jax.random.key(0), CFG, N, 0)


# ----------------------------------------------------------------------------------------------
# Pretraining
# ----------------------------------------------------------------------------------------------


def test_pretrain_sequences_match_reference(pretrain):
    for ex in rows(pretrain):
        ops, text = ops_of(ex), text_of(ex)
        assert CFG.min_len <= len(text) <= CFG.max_len
        a, b = ref.true_segments(ops, text)
        expected = ref.layout(ops, text, [a] if b is None else [a, b], CFG.T)
        assert strings(ex["tokens_true"]) == expected
        mode = data.MODES[int(ex["mode"])]
        tokens, mask = strings(ex["tokens"]), ex["loss_mask"]
        L = len(text)
        text_region = set(range(5, 7 + L))  # SOT, letters, EOT
        seg_a = set(range(7 + L, 8 + 2 * L))  # a + STOP
        end = 8 + 2 * L if b is None else 9 + 3 * L  # EOS position
        seg_b = set(range(8 + 2 * L, 9 + 3 * L)) if b is not None else set()
        trained = set(np.flatnonzero(mask))
        if mode == "pcfg":
            assert trained == text_region
            assert tokens[1:5] == ["#"] * 4 and tokens[7 + L:] == ["#"] * (CFG.T - 7 - L)
            assert tokens[5:7 + L] == expected[5:7 + L]
        elif mode == "full":
            assert trained == text_region | seg_a | seg_b | {end} and tokens == expected
        elif mode == "comp1":
            assert trained == text_region | seg_a and tokens == expected
        else:  # comp2: text letters hidden, the last segment (+STOP, EOS) trained
            assert trained == (seg_b or seg_a) | {end}
            assert tokens[6:6 + L] == ["#"] * L
            assert tokens[:6] == expected[:6] and tokens[6 + L:] == expected[6 + L:]


def test_pretrain_text_is_in_the_full_grammar(pretrain):
    for ex in rows(pretrain)[:12]:
        assert ref.is_substring_of_language(text_of(ex), int(ex["pcfg"]), "full")


def test_pretrain_unsafe_label(pretrain):
    for ex in rows(pretrain):
        U = ref.unsafe_set(int(ex["pcfg"]), "safe" if branch_of(ex) == "safe" else "unsafe")
        assert bool(ex["unsafe"]) == any(ref.base_of(o) in U for o in ops_of(ex))


def _expected_operator_marginal():
    """P(slot holds token t) under SPEC §5 (no null operator): 0.5 four i.i.d. draws; else a
    special (( r4 r3) on a uniform slot plus three i.i.d. draws."""
    p = np.full(16, 1 / 16)
    special = np.zeros(16)
    special[[gr.TOKEN_ID[t] for t in ("(", "r4", "r3")]] = 1 / 3
    return 0.5 * p + 0.5 * (0.75 * p + 0.25 * special)


def test_pretrain_frequencies():
    n = 20_480
    batch = many(data.sample_pretrain_batch, jax.random.key(5), n, 0)
    ops = np.asarray(batch["ops"])
    null = np.asarray(batch["null_slot"])
    clean = ops[null < 0].reshape(-1)
    freq = np.bincount(clean, minlength=16)[:16] / clean.size
    np.testing.assert_allclose(freq, _expected_operator_marginal(), atol=0.004)
    assert abs((null >= 0).mean() - CFG.p_null_op) < 0.003
    nulls = ops[null >= 0, null[null >= 0]] if (null >= 0).any() else np.array([])
    assert set(np.unique(nulls)) <= {gr.EX1, gr.EX2}
    np.testing.assert_allclose(np.bincount(null[null >= 0], minlength=4) / (null >= 0).sum(), 0.25, atol=0.1)
    np.testing.assert_allclose(np.bincount(np.asarray(batch["pcfg"]), minlength=5)[1:] / n, 0.25, atol=0.015)
    modes = np.bincount(np.asarray(batch["mode"]), minlength=4) / n
    np.testing.assert_allclose(modes, CFG.mode_probs_start, atol=0.015)


@pytest.mark.parametrize("step,expected", [
    (0, (0.5, 0.1, 0.2, 0.2)),
    (10_000, (0.5, 0.1, 0.2, 0.2)),
    (55_000, (0.3, 0.15, 0.25, 0.3)),
    (100_000, (0.1, 0.2, 0.3, 0.4)),
    (250_000, (0.1, 0.2, 0.3, 0.4)),
])
def test_curriculum_schedule(step, expected):
    np.testing.assert_allclose(data.mode_probs(CFG, step), expected, atol=1e-6)


def test_curriculum_mode_frequencies_follow_the_step():
    n = 8192
    batch = many(data.sample_pretrain_batch, jax.random.key(6), n, 100_000)
    modes = np.bincount(np.asarray(batch["mode"]), minlength=4) / n
    np.testing.assert_allclose(modes, CFG.mode_probs_end, atol=0.02)


# ----------------------------------------------------------------------------------------------
# Purity, shapes and configuration
# ----------------------------------------------------------------------------------------------


def test_same_key_same_batch_different_key_different_batch():
    a = data.sample_pretrain_batch(jax.random.key(0), CFG, N, 0)
    b = data.sample_pretrain_batch(jax.random.key(0), CFG, N, 0)
    c = data.sample_pretrain_batch(jax.random.key(1), CFG, N, 0)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["tokens"], c["tokens"])


def test_static_shapes_under_jit_and_vmap():
    out = data.sample_pretrain_batch(jax.random.key(0), CFG, N, jnp.int32(7))  # traced step
    assert out["tokens"].shape == (N, CFG.T) and out["tokens"].dtype == np.int32
    assert out["loss_mask"].shape == (N, CFG.T) and out["text"].shape == (N, CFG.max_len)
    # (vmapped over keys, a leading replica axis: test_safety_data.py's samplers)


def test_tiny_lengths_and_longer_sequences():
    cfg = data.DataConfig(min_len=4, max_len=6, seq_len=40)
    batch = data.sample_pretrain_batch(jax.random.key(0), cfg, 64, 0)
    assert batch["tokens"].shape == (64, 40)
    for ex in rows(batch):
        a, b = ref.true_segments(ops_of(ex), text_of(ex))
        assert strings(ex["tokens_true"]) == ref.layout(ops_of(ex), text_of(ex), [a] if b is None else [a, b], 40)


@pytest.mark.parametrize("kwargs,match", [
    (dict(min_len=10, max_len=5), "min_len"),
    (dict(seq_len=50), "seq_len"),
    (dict(p_unsafe=1.5), "p_unsafe"),
    (dict(mode_probs_start=(0.5, 0.5, 0.5, 0.5)), "sum"),
    (dict(mode_probs_end=(1.0,)), "4 probabilities"),
    (dict(curriculum_hold_steps=10, curriculum_end_step=5), "curriculum"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.DataConfig(**kwargs)


def test_config_lists_become_tuples():
    assert data.DataConfig(mode_probs_start=[0.25] * 4).mode_probs_start == (0.25,) * 4


# ----------------------------------------------------------------------------------------------
# The pieces the safety data is built from (public for safety_data.py)
# ----------------------------------------------------------------------------------------------


def test_operator_tables_and_masks_match_reference():
    for pcfg in gr.PCFGS:
        for branch, name in ((gr.BRANCH_SAFE, "safe"), (gr.BRANCH_UNSAFE, "unsafe")):
            got = {ref.BASE_OPS[i] for i in np.flatnonzero(np.asarray(data.unsafe_set(pcfg, branch)))}
            assert got == ref.unsafe_set(pcfg, name), (pcfg, name)
        for kind in gr.GRAMMAR_KINDS:
            assert data.kind_index(pcfg, kind) == gr.grammar_index(pcfg, kind)
    base = np.asarray(data.tables()["base_of_op"])
    assert [ref.BASE_OPS[base[gr.TOKEN_ID[t]]] for t in ("+", "r1", "r4")] == [ref.base_of(t) for t in ("+", "r1", "r4")]
    assert (base[16:] == -1).all()  # only operator tokens have a base operator
    mask = np.asarray(data.base_mask(np.arange(10) % 3 == 0))
    assert mask.shape == (gr.N_OPERATORS,) and np.flatnonzero(mask).tolist() == [0, 3, 6, 9]
    assert np.flatnonzero(np.asarray(data.token_mask([gr.TOKEN_ID["r2"], gr.TOKEN_ID["+"]]))).tolist() == \
        sorted([gr.TOKEN_ID["r2"], gr.TOKEN_ID["+"]])


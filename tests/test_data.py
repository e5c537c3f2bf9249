"""The samplers of safety_mech.data checked example by example against tests/reference.py."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from safety_mech import data, grammar as gr

CFG = data.DataConfig()  # the paper's lengths: text 25..35, T = 115
N = 512  # one batch size everywhere, so each sampler compiles once


def many(sampler, key, n, *args):
    """n examples from repeated calls of a batch sampler at batch size N (no recompilation)."""
    parts = [sampler(k, CFG, N, *args) for k in jax.random.split(key, -(-n // N))]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def rows(batch):
    """Batch dict -> list of per-example dicts of numpy values."""
    batch = {k: np.asarray(v) for k, v in batch.items()}
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def strings(tokens):
    return [gr.VOCAB[int(t)] for t in tokens]


def text_of(ex):
    return [ref.LETTERS[x] for x in ex["text"][: ex["text_len"]]]


def ops_of(ex):
    return strings(ex["ops"])


def branch_of(ex):
    return gr.BRANCH_NAMES[int(ex["branch"])]


@pytest.fixture(scope="module")
def pretrain():
    return data.sample_pretrain_batch(jax.random.key(0), CFG, N, 0)


@pytest.fixture(scope="module")
def finetune():
    return data.sample_finetune_batch(jax.random.key(1), CFG, N)


@pytest.fixture(scope="module")
def eval_sets():
    return {name: data.sample_eval_set(jax.random.key(2), CFG, name, N) for name in data.EVAL_SETS}


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
# Safety fine-tuning
# ----------------------------------------------------------------------------------------------


def _check_safety_example(ex, tokens_desired=None, tokens_undesired=None):
    """Rebuild the example's completions from its ops and text with the reference."""
    pcfg, branch, ops, text = int(ex["pcfg"]), branch_of(ex), ops_of(ex), text_of(ex)
    a, b = ref.true_segments(ops, text)
    refusal = ["2a"] * len(text)
    harmful = ref.layout(ops, text, [a, b], CFG.T)
    refusal_seq = ref.layout(ops, text, [a, refusal] if ex["second_pair"] else [refusal], CFG.T)
    return harmful, refusal_seq


def test_finetune_completions_match_reference(finetune):
    for ex in rows(finetune):
        ops, text = ops_of(ex), text_of(ex)
        true_seq, refusal_seq = _check_safety_example(ex)
        desired, undesired = strings(ex["tokens_desired"]), strings(ex["tokens_undesired"])
        if ex["unsafe"]:
            assert desired == refusal_seq and undesired == true_seq
        else:
            assert desired == true_seq and undesired == refusal_seq
            assert not ex["second_pair"]
        L = len(text)
        for seq, mask in ((desired, ex["mask_desired"]), (undesired, ex["mask_undesired"])):
            eos = seq.index("%")
            assert set(np.flatnonzero(mask)) == set(range(7 + L, eos + 1))  # response only
        assert int(ex["prompt_len"]) == 7 + L


def test_finetune_safety_labels(finetune):
    for ex in rows(finetune):
        pcfg, branch, ops = int(ex["pcfg"]), branch_of(ex), ops_of(ex)
        assert branch in ("safe", "unsafe")
        U = ref.unsafe_set(pcfg, branch)
        assert all(o in ref.BASE_OPS for o in ops)  # no duplicates, no null operators
        pairs = [ops[:2], ops[2:]]
        if ex["unsafe"]:
            governed = pairs[1:] if ex["second_pair"] else pairs
            assert all(any(o in U for o in pair) for pair in governed)
            if ex["second_pair"]:
                assert pairs[0] == ["(", "("]
        else:
            assert not any(o in U for o in ops)


def test_finetune_texts_come_from_the_right_grammar(finetune):
    for ex in rows(finetune)[:16]:
        kind = "safe" if branch_of(ex) == "safe" else "id_mg"
        assert ref.is_substring_of_language(text_of(ex), int(ex["pcfg"]), kind)


def test_finetune_frequencies():
    batch = many(data.sample_finetune_batch, jax.random.key(9), 20_480)
    assert abs(batch["unsafe"].mean() - CFG.p_unsafe) < 0.01
    assert abs(batch["branch"].mean() - 0.5) < 0.015  # 0 safe / 1 unsafe text, 50/50
    assert abs(batch["second_pair"][batch["unsafe"]].mean() - CFG.p_second_pair) < 0.02
    safe = ~batch["unsafe"]
    # The operator rule: with prob 0.5 one slot is forced to '(', so '(' is over-represented.
    for pcfg in gr.PCFGS:
        sel = safe & (batch["pcfg"] == pcfg) & (batch["branch"] == 0)
        allowed = sorted(set(ref.BASE_OPS) - ref.unsafe_set(pcfg, "safe"))
        freq = np.bincount(batch["ops"][sel].reshape(-1), minlength=16) / (4 * sel.sum())
        k = len(allowed)
        for tok in allowed:
            p = 0.5 / k + 0.5 * (0.75 / k + 0.25 * (tok == "("))
            assert abs(freq[gr.TOKEN_ID[tok]] - p) < 0.015, (pcfg, tok)


def test_per_batch_mixing():
    cfg = dataclasses.replace(CFG, per_batch_mixing=True, p_unsafe=0.5)
    fracs = [np.asarray(data.sample_finetune_batch(jax.random.key(i), cfg, N)["unsafe"]).mean()
             for i in range(12)]
    assert set(fracs) == {0.0, 1.0}


# ----------------------------------------------------------------------------------------------
# Evaluation sets (SPEC §9)
# ----------------------------------------------------------------------------------------------


def test_eval_targets_match_reference(eval_sets):
    for name, batch in eval_sets.items():
        for ex in rows(batch):
            text, ops = text_of(ex), ops_of(ex)
            true_seq, refusal_seq = _check_safety_example(ex)
            assert strings(ex["tokens_true"]) == true_seq
            assert strings(ex["tokens_harmful"]) == true_seq
            assert strings(ex["tokens_refusal"]) == refusal_seq
            L = len(text)
            assert strings(ex["prompt"]) == true_seq[: 7 + L] + ["#"] * (CFG.T - 7 - L)
            # Governed segment: both segments, or only b when pair 1 is the safe "( (".
            gov = set(range(8 + 2 * L, 9 + 3 * L))
            if not ex["second_pair"]:
                gov |= set(range(7 + L, 8 + 2 * L))
            assert set(np.flatnonzero(ex["gov_mask_true"])) == gov
            ref_gov = set(range(7 + L, 8 + 2 * L)) if not ex["second_pair"] else set(range(8 + 2 * L, 9 + 3 * L))
            assert set(np.flatnonzero(ex["gov_mask_refusal"])) == ref_gov
            assert bool(ex["unsafe"]) == (name != "safe")


def test_eval_set_structure(eval_sets):
    for name, batch in eval_sets.items():
        for ex in rows(batch):
            pcfg, branch, ops = int(ex["pcfg"]), branch_of(ex), ops_of(ex)
            entry = ref.DATA["unsafe_operators"][str(pcfg)]
            on_safe, on_unsafe = set(entry["on_safe_text"]), set(entry["on_unsafe_text"])
            pairs = [ops[:2], ops[2:]]
            if name in ("safe", "unsafe", "jb_co_task"):
                assert branch in ("safe", "unsafe")
                U = ref.unsafe_set(pcfg, branch)
            if name == "safe":
                assert not any(o in U for o in ops) and all(o in ref.BASE_OPS for o in ops)
            elif name == "unsafe":
                governed = pairs[1:] if ex["second_pair"] else pairs
                assert all(any(o in U for o in p) for p in governed)
            elif name == "jb_co_task":
                for p in pairs:
                    assert sum(o in U for o in p) == 1
                    safe_op = [o for o in p if o not in U][0]
                    assert safe_op in ref.BASE_OPS and safe_op != "("
            elif name == "jb_co_text":
                assert branch == "mixed" and set(ops) <= on_unsafe - on_safe
            elif name == "jb_misgen_text":
                assert branch == "unsafe" and set(ops) <= on_unsafe
            elif name == "jb_misgen_tokens":
                assert pcfg in (1, 3, 4) and branch == "unsafe"
                for p in pairs:
                    assert sorted(o in ("r1", "r2", "r3", "r4") for o in p) == [False, True]
                    assert [o for o in p if o not in ("r1", "r2", "r3", "r4")][0] in ("(", "+", "^")
                    # r1..r4 act as ')' or '[', which are unsafe on unsafe text of these PCFGs.
                    assert any(ref.base_of(o) in on_unsafe for o in p)


@pytest.mark.parametrize("name,kind", [
    ("safe", None), ("jb_co_text", "intermediate"), ("jb_misgen_text", "ood_mg"),
    ("jb_misgen_tokens", "id_mg")])
def test_eval_texts_come_from_their_grammar(eval_sets, name, kind):
    for ex in rows(eval_sets[name])[:10]:
        k = kind or ("safe" if branch_of(ex) == "safe" else "id_mg")
        assert ref.is_substring_of_language(text_of(ex), int(ex["pcfg"]), k)


def test_eval_set_frequencies(eval_sets):
    for name, batch in eval_sets.items():
        b = {k: np.asarray(v) for k, v in batch.items()}
        pcfgs = np.bincount(b["pcfg"], minlength=5)[1:] / N
        if name == "jb_misgen_tokens":
            np.testing.assert_allclose(pcfgs, [1 / 3, 0, 1 / 3, 1 / 3], atol=0.07)
        else:
            np.testing.assert_allclose(pcfgs, 0.25, atol=0.07)
        if name in ("safe", "unsafe", "jb_co_task"):
            assert abs(b["branch"].mean() - 0.5) < 0.07
        if name == "unsafe":
            assert abs(b["second_pair"].mean() - CFG.p_second_pair) < 0.06


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
    f1 = data.sample_finetune_batch(jax.random.key(3), CFG, N)
    f2 = data.sample_finetune_batch(jax.random.key(4), CFG, N)
    assert not np.array_equal(f1["tokens_desired"], f2["tokens_desired"])


def test_static_shapes_under_jit_and_vmap():
    out = data.sample_pretrain_batch(jax.random.key(0), CFG, N, jnp.int32(7))  # traced step
    assert out["tokens"].shape == (N, CFG.T) and out["tokens"].dtype == np.int32
    assert out["loss_mask"].shape == (N, CFG.T) and out["text"].shape == (N, CFG.max_len)
    # vmap over keys of the batch sampler: a leading replica axis.
    keys = jax.random.split(jax.random.key(0), 3)
    rep = jax.vmap(lambda k: data.sample_finetune_batch(k, CFG, 4))(keys)
    assert rep["tokens_desired"].shape == (3, 4, CFG.T)
    ev = jax.vmap(lambda k: data.sample_eval(k, CFG, "jb_co_task"))(keys)
    assert ev["prompt"].shape == (3, CFG.T)


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


def test_config_from_dict_rejects_unknown_keys():
    from safety_mech.train import dataclass_from_config  # the one config-group builder
    with pytest.raises(ValueError, match="unknown key"):
        dataclass_from_config(data.DataConfig, {"max_len": 10, "maxlen": 3}, "data")
    assert data.DataConfig(mode_probs_start=[0.25] * 4).mode_probs_start == (0.25,) * 4


def test_decode():
    assert data.decode([gr.BOS, 0, gr.PAD, gr.LETTER0, gr.STOP]) == ["$", "(", "2a", "*^"]
    assert data.decode([[gr.PAD, gr.EX1]], strip_pad=False) == [["#", "ex1"]]
    with pytest.raises(ValueError, match="unknown"):
        data.sample_eval_set(jax.random.key(0), CFG, "nope", 4)


def test_eval_set_in_blocks_equals_one_vmapped_call():
    """sample_eval_set samples in fixed blocks (one compilation per set whatever n): example i is
    still the one drawn from split(key, n)[i], across a block boundary and a partial last block."""
    n = data.EVAL_BLOCK + 3
    blocked = data.sample_eval_set(jax.random.key(9), CFG, "unsafe", n)
    keys = jax.random.split(jax.random.key(9), n)
    direct = jax.jit(jax.vmap(data.sample_eval, in_axes=(0, None, None)), static_argnums=(1, 2))(keys, CFG, "unsafe")
    assert jax.tree.structure(blocked) == jax.tree.structure(direct)
    for a, b in zip(jax.tree.leaves(blocked), jax.tree.leaves(direct)):
        assert a.shape[0] == n
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # under jit it is one traced call with the same values
    traced = jax.jit(lambda k: data.sample_eval_set(k, CFG, "unsafe", 5))(jax.random.key(9))
    np.testing.assert_array_equal(np.asarray(traced["prompt"]), np.asarray(
        data.sample_eval_set(jax.random.key(9), CFG, "unsafe", 5)["prompt"]))

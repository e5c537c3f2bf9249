"""The safety data of safety_mech/safety_data.py (fine-tuning examples, SPEC §7; evaluation and
jailbreak sets, SPEC §9) checked example by example against tests/reference.py."""
import dataclasses

import jax
import numpy as np
import pytest

import reference as ref
from safety_mech import data, safety_data
from safety_mech import grammar as gr
from sample_rows import branch_of, ops_of, rows, strings, text_of
from sample_rows import many as _many

CFG = data.DataConfig()  # the paper's lengths: text 25..35, T = 115
N = 512  # one batch size everywhere (as test_data.py), so each sampler compiles once


def many(sampler, key, n, *args):
    return _many(sampler, key, n, CFG, N, *args)


@pytest.fixture(scope="module")
def finetune():
    return safety_data.sample_finetune_batch(jax.random.key(1), CFG, N)


@pytest.fixture(scope="module")
def eval_sets():
    return {name: safety_data.sample_eval_set(jax.random.key(2), CFG, name, N) for name in safety_data.EVAL_SETS}


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
    batch = many(safety_data.sample_finetune_batch, jax.random.key(9), 20_480)
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
    fracs = [np.asarray(safety_data.sample_finetune_batch(jax.random.key(i), cfg, N)["unsafe"]).mean()
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
# Purity, shapes, the operator rule
# ----------------------------------------------------------------------------------------------


def test_different_keys_different_batches():
    f1 = safety_data.sample_finetune_batch(jax.random.key(3), CFG, N)
    f2 = safety_data.sample_finetune_batch(jax.random.key(4), CFG, N)
    again = safety_data.sample_finetune_batch(jax.random.key(3), CFG, N)
    assert not np.array_equal(f1["tokens_desired"], f2["tokens_desired"])
    for k in f1:
        np.testing.assert_array_equal(f1[k], again[k])


def test_static_shapes_under_vmap():
    keys = jax.random.split(jax.random.key(0), 3)
    rep = jax.vmap(lambda k: safety_data.sample_finetune_batch(k, CFG, 4))(keys)  # a leading replica axis
    assert rep["tokens_desired"].shape == (3, 4, CFG.T) and rep["mask_undesired"].shape == (3, 4, CFG.T)
    ev = jax.vmap(lambda k: safety_data.sample_eval(k, CFG, "jb_co_task"))(keys)
    assert ev["prompt"].shape == (3, CFG.T)
    with pytest.raises(ValueError, match="unknown"):
        safety_data.sample_eval_set(jax.random.key(0), CFG, "nope", 4)


def test_operator_rule_ignores_the_pretraining_rule():
    """SPEC §7: the safety data draws operators by its own rule (SAFETY_P_FOUR_IID), whatever
    data.p_four_iid the pretraining used: the same key gives the same examples."""
    assert safety_data.SAFETY_P_FOUR_IID == 0.5
    other = dataclasses.replace(CFG, p_four_iid=1.0)
    a = safety_data.sample_eval_set(jax.random.key(5), CFG, "safe", 8)
    b = safety_data.sample_eval_set(jax.random.key(5), other, "safe", 8)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_eval_set_in_blocks_equals_one_vmapped_call():
    """sample_eval_set samples in fixed blocks (one compilation per set whatever n): example i is
    still the one drawn from split(key, n)[i], across a block boundary and a partial last block."""
    n = safety_data.EVAL_BLOCK + 3
    blocked = safety_data.sample_eval_set(jax.random.key(9), CFG, "unsafe", n)
    keys = jax.random.split(jax.random.key(9), n)
    direct = jax.jit(jax.vmap(safety_data.sample_eval, in_axes=(0, None, None)),
                     static_argnums=(1, 2))(keys, CFG, "unsafe")
    assert jax.tree.structure(blocked) == jax.tree.structure(direct)
    for a, b in zip(jax.tree.leaves(blocked), jax.tree.leaves(direct)):
        assert a.shape[0] == n
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # under jit it is one traced call with the same values
    traced = jax.jit(lambda k: safety_data.sample_eval_set(k, CFG, "unsafe", 5))(jax.random.key(9))
    np.testing.assert_array_equal(np.asarray(traced["prompt"]), np.asarray(
        safety_data.sample_eval_set(jax.random.key(9), CFG, "unsafe", 5)["prompt"]))

"""Grammar compilation, operator tables and the text sampler against the numpy reference."""
import functools

import jax
import numpy as np
import pytest

import reference as ref
from safety_mech import data, grammar as gr

PAPER = data.DataConfig()


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _windows(key, g, n, min_len, max_len):
    """n windows of grammar row g: (letters [n, max_len], lengths [n], branch [n])."""
    keys = jax.random.split(key, n)
    return jax.vmap(lambda k: data.sample_text(k, g, min_len, max_len))(keys)


@functools.partial(jax.jit, static_argnums=(2,))
def _full_strings(key, g, n):
    return jax.vmap(lambda k: data.sample_full_string(k, g))(jax.random.split(key, n))


def test_vocabulary_matches_json():
    assert list(gr.VOCAB) == ref.VOCAB and gr.VOCAB_SIZE == 54
    assert gr.VOCAB[gr.EOT] == ">" and gr.VOCAB[gr.BOS] == "$" and gr.VOCAB[gr.EOS] == "%"
    assert gr.VOCAB[gr.SOT] == "*" and gr.VOCAB[gr.PAD] == "#" and gr.VOCAB[gr.STOP] == "*^"
    assert gr.VOCAB[gr.LETTER0] == "2a" and gr.VOCAB[gr.EX1] == "ex1" and gr.VOCAB[gr.EX2] == "ex2"


@pytest.mark.parametrize("seed", range(9))
def test_permutations_are_numpy_legacy_seeds(seed):
    np.random.seed(seed)  # the legacy global API, exactly as SPEC §2 states it
    expected = np.random.permutation(30)
    np.testing.assert_array_equal(gr.legacy_permutation(seed), expected)
    np.testing.assert_array_equal(expected, ref.DATA["permutations_seed_0_to_8"][str(seed)])
    # Operator token ')' is permutation 0, ..., '£' is permutation 8.
    np.testing.assert_array_equal(gr.operator_letter_maps()[1 + seed], expected)


def test_operator_maps_match_reference_descriptions():
    maps = gr.operator_letter_maps()
    letters = list(ref.LETTERS)
    for tok in ref.DATA["operator_tokens"] + ["ex1", "ex2"]:
        ours = [ref.LETTERS[j] for j in maps[gr.TOKEN_ID[tok]]]
        assert ours == ref.apply_op(tok, letters), tok


def test_unsafe_table_matches_json():
    table = gr.unsafe_operator_table()
    for pcfg in gr.PCFGS:
        for b, branch in enumerate(("safe", "unsafe")):
            ours = {gr.VOCAB[i] for i in np.flatnonzero(table[pcfg, b])}
            assert ours == ref.unsafe_set(pcfg, branch)


def test_probabilities_are_validated():
    np.testing.assert_allclose(gr.normalized_probs("x", [0.33, 0.33, 0.33]), [1 / 3] * 3)
    with pytest.raises(ValueError, match="sum to 1"):
        gr.normalized_probs("x", [0.5, 0.6])
    with pytest.raises(ValueError, match="sum to 1"):
        gr.normalized_probs("x", [1.2, -0.2])


def test_compiled_lengths_match_reference_ranges():
    t = gr.compile_grammars()
    for pcfg in gr.PCFGS:
        for kind in gr.GRAMMAR_KINDS:
            g = gr.grammar_index(pcfg, kind)
            rng = np.random.default_rng(g)
            lens = [len(ref.sample_string(rng, pcfg, kind)) for _ in range(50)]
            assert t.min_string_len[g] <= min(lens) and max(lens) <= t.max_string_len[g]
    assert t.min_string_len.min() >= PAPER.max_len + 1  # so paper windows are never clipped


@pytest.fixture(scope="module")
def full_strings():
    """400 whole strings of each of the 24 grammars, sampled by the JAX sampler."""
    out = {}
    for pcfg in gr.PCFGS:
        for kind in gr.GRAMMAR_KINDS:
            g = gr.grammar_index(pcfg, kind)
            letters, lengths = _full_strings(jax.random.key(100 + g), g, 400)
            out[pcfg, kind] = (np.asarray(letters), np.asarray(lengths))
    return out


def test_mean_string_length_matches_exact_expectation(full_strings):
    """E[len] computed exactly from the rules; 400 samples must lie within 5 standard errors."""
    for (pcfg, kind), (letters, lengths) in full_strings.items():
        assert np.all((letters >= 0).sum(1) == lengths)
        mean, se = lengths.mean(), lengths.std() / np.sqrt(len(lengths)) + 1e-9
        assert abs(mean - ref.expected_length(pcfg, kind)) < 5 * se + 1e-6, (pcfg, kind, mean)


def test_full_strings_of_short_grammars_are_in_the_language(full_strings):
    """Exact membership (chart parser) of whole strings of the grammars with <= 54 letters."""
    for kind in ("id_mg", "ood_mg", "intermediate"):
        for pcfg in gr.PCFGS:
            letters, lengths = full_strings[pcfg, kind]
            for row, n in list(zip(letters, lengths))[:3]:
                string = [ref.LETTERS[x] for x in row[:n]]
                assert ref.is_substring_of_language(string, pcfg, kind, whole=True), (pcfg, kind)
    letters, lengths = full_strings[1, "id_mg"]
    corrupted = [ref.LETTERS[x] for x in letters[0, : lengths[0] - 1]]  # one letter short
    assert not ref.is_substring_of_language(corrupted, 1, "id_mg", whole=True)


@pytest.mark.parametrize("kind", gr.GRAMMAR_KINDS)
def test_windows_are_substrings_of_their_grammar(kind):
    cfg = PAPER
    for pcfg in gr.PCFGS:
        g = gr.grammar_index(pcfg, kind)
        letters, lengths, _ = _windows(jax.random.key(g), g, 6, cfg.min_len, cfg.max_len)
        for row, n in zip(np.asarray(letters), np.asarray(lengths)):
            assert cfg.min_len <= n <= cfg.max_len
            window = [ref.LETTERS[x] for x in row[:n]]
            assert ref.is_substring_of_language(window, pcfg, kind), (pcfg, kind, window)


def test_parser_rejects_non_members():
    """The membership check must be able to fail: a window of the unsafe-only grammar contains
    level-5 rules with two children, which the safe grammar cannot produce, and a random string
    is not a substring of any grammar."""
    rng = np.random.default_rng(0)
    random_window = list(rng.choice(ref.LETTERS, 30))
    assert not ref.is_substring_of_language(random_window, 1, "full")
    unsafe_window = ref.sample_window(rng, 1, "id_mg", 30, 30)
    assert ref.is_substring_of_language(unsafe_window, 1, "id_mg")
    assert not ref.is_substring_of_language(unsafe_window, 1, "safe")


def _letter_and_bigram_freqs(windows):
    uni = np.zeros(30)
    bi = np.zeros((30, 30))
    for w in windows:
        idx = [ref.LETTERS.index(x) if isinstance(x, str) else int(x) for x in w]
        np.add.at(uni, idx, 1)
        np.add.at(bi, (idx[:-1], idx[1:]), 1)
    return uni / uni.sum(), bi / bi.sum()


@pytest.mark.parametrize("pcfg,kind", [(1, "full"), (2, "safe"), (3, "id_mg"), (4, "intermediate")])
def test_window_statistics_match_naive_sampler(pcfg, kind):
    """Letter and bigram frequencies and the window-length distribution of the JAX sampler equal
    those of the naive recursive reference sampler (total variation, 3000 windows each)."""
    n, cfg = 3000, PAPER
    g = gr.grammar_index(pcfg, kind)
    letters, lengths, _ = _windows(jax.random.key(7), g, n, cfg.min_len, cfg.max_len)
    ours = [row[:k] for row, k in zip(np.asarray(letters), np.asarray(lengths))]
    rng = np.random.default_rng(7)
    theirs = [ref.sample_window(rng, pcfg, kind, cfg.min_len, cfg.max_len) for _ in range(n)]
    (u1, b1), (u2, b2) = _letter_and_bigram_freqs(ours), _letter_and_bigram_freqs(theirs)
    assert 0.5 * np.abs(u1 - u2).sum() < 0.02
    assert 0.5 * np.abs(b1 - b2).sum() < 0.06
    h1 = np.bincount(np.asarray(lengths), minlength=cfg.max_len + 1)[cfg.min_len:] / n
    np.testing.assert_allclose(h1, 1 / 11, atol=0.025)
    # The first letter of a window is where a biased window start would show.
    f1 = np.bincount([w[0] for w in ours], minlength=30) / n
    f2 = np.bincount([ref.LETTERS.index(w[0]) for w in theirs], minlength=30) / n
    assert 0.5 * np.abs(f1 - f2).sum() < 0.08


def test_full_grammar_window_branch_matches_reference():
    """`full` windows covering only r/q/p subtrees are safe, only 10$/10#/10* unsafe, else mixed:
    the label frequencies equal those of the tag-tracking reference sampler."""
    n = 2000
    g = gr.grammar_index(2, "full")
    _, _, branch = _windows(jax.random.key(3), g, n, 25, 35)
    ours = np.bincount(np.asarray(branch), minlength=3) / n
    rng = np.random.default_rng(3)
    names = [ref.sample_tagged_window(rng, 2, "full", 25, 35)[1] for _ in range(n)]
    theirs = np.array([names.count(b) for b in gr.BRANCH_NAMES]) / n
    assert ours.min() > 0.05  # all three occur
    np.testing.assert_allclose(ours, theirs, atol=0.04)


def test_short_strings_are_clipped():
    """A window longer than the whole string takes the whole string (documented choice)."""
    g = gr.grammar_index(1, "id_mg")  # strings of 36..54 letters
    letters, lengths, _ = _windows(jax.random.key(0), g, 50, 60, 70)
    lengths = np.asarray(lengths)
    assert lengths.min() >= 36 and lengths.max() <= 54
    for row, n in list(zip(np.asarray(letters), lengths))[:3]:
        assert ref.is_substring_of_language([ref.LETTERS[x] for x in row[:n]], 1, "id_mg", whole=True)


def test_decode_and_readable_tokens():
    assert gr.decode([gr.BOS, 0, gr.PAD, gr.LETTER0, gr.STOP]) == ["$", "(", "2a", "*^"]
    assert gr.decode([[gr.PAD, gr.EX1]], strip_pad=False) == [["#", "ex1"]]
    assert gr.letters_to_tokens(np.array([0, 1, 29, 5]), 3) == ["2a", "2b", "3d"]
    # the response: after the prompt, up to and including the last STOP (EOS and PAD dropped)
    seq = [gr.BOS, 0, 0, 0, 0, gr.SOT, gr.LETTER0, gr.EOT, gr.LETTER0 + 1, gr.STOP, gr.LETTER0 + 2, gr.STOP,
           gr.EOS, gr.PAD]
    assert gr.response_of(np.array(seq), 8) == ["2b", "*^", "2c", "*^"]
    assert gr.response_of(np.array(seq[:9] + [gr.EOS]), 8) == []  # no STOP: no response

"""analysis/bayes.py: exact operator likelihoods against the sampler, a calibrated posterior, planted
text structure, the ceilings and refusal_ceiling.py."""
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from safety_mech import data as data_lib
from safety_mech import grammar as gr
from safety_mech import metrics, safety_data
from safety_mech.analysis import bayes

L = 1  # one-letter texts: 30 windows, so a few thousand sampled windows give P(text | PCFG, branch) ~exactly
CFG = data_lib.DataConfig(min_len=L, max_len=L)  # what refusal_ceiling(L) samples: one compiled sampler
N = 4000
KEYS = ("text", "text_len", "ops", "pcfg", "branch", "unsafe")
UNSAFE = np.asarray(data_lib.tables()["unsafe_ops"])


@pytest.fixture(scope="module")
def sets():
    return {name: metrics.sample_eval_data(jax.random.key(3), CFG, name, N, KEYS) for name in ("unsafe", "safe")}


@pytest.fixture(scope="module")
def counts():
    return bayes.window_counts(L, 20_000)


def _planted(windows: dict, length=2):
    """WindowCounts with the given windows per group and 100 filler windows elsewhere (letters 29)."""
    filler = np.full((100, length), 29)
    return bayes.WindowCounts.from_windows({g: np.asarray(windows.get(g, filler)) for g in bayes.GROUPS})


def test_operator_likelihoods_are_distributions_on_the_right_support():
    table = bayes.operator_likelihoods(0.2)
    np.testing.assert_allclose(table[1:].sum(axis=(3, 4, 5, 6)), 1.0, atol=1e-12)
    ops = np.indices((10,) * 4).reshape(4, -1).T  # every operator row
    for pcfg, branch in bayes.GROUPS:
        any_unsafe = UNSAFE[pcfg, branch][ops].any(1)
        safe, unsafe = table[pcfg, branch, 0].reshape(-1), table[pcfg, branch, 1].reshape(-1)
        assert (safe[any_unsafe] == 0).all() and (safe[~any_unsafe] > 0).all()
        assert (unsafe[~any_unsafe] == 0).all()  # every unsafe input carries an unsafe operator
        # pair 1 '( (' only in the second-pair case (prob 0.2) or when pair 1 was replaced: never
        assert unsafe.reshape(10, 10, 100)[0, 0].sum() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="base operator ids"):
        bayes.operator_likelihood(np.array([[0, 0, 0, 12]]))


def _pattern_chi2(ev, unsafe: int):
    """(chi², cells) of each slot's category ('(' / unsafe for the group / other) over the 81 patterns,
    observed against the exact likelihoods, pooled over the groups."""
    table = bayes.operator_likelihoods(0.2)
    all_ops = np.indices((10,) * 4).reshape(4, -1)
    obs, exp = np.zeros(81), np.zeros(81)
    for pcfg, branch in bayes.GROUPS:
        m = (ev["pcfg"] == pcfg) & (ev["branch"] == branch)
        category = np.where(np.arange(10) == gr.IDENTITY_OP, 0, np.where(UNSAFE[pcfg, branch], 1, 2))
        obs += np.bincount((category[ev["ops"][m]] * 3 ** np.arange(4)).sum(1), minlength=81)
        pattern = (category[all_ops].T * 3 ** np.arange(4)).sum(1)
        exp += m.sum() * np.bincount(pattern, weights=table[pcfg, branch, unsafe].reshape(-1), minlength=81)
    assert (obs[exp == 0] == 0).all()  # nothing sampled that the likelihoods call impossible
    cells = exp >= 5
    return ((obs[cells] - exp[cells]) ** 2 / exp[cells]).sum(), cells.sum()


def test_operator_likelihoods_match_the_sampled_sets(sets, monkeypatch):
    for name, unsafe in (("safe", 0), ("unsafe", 1)):
        chi2, cells = _pattern_chi2(sets[name], unsafe)
        dof = cells - 1
        assert chi2 < dof + 6 * np.sqrt(2 * dof), (name, chi2, cells)
    # the test has power: four i.i.d. draws (the rule the old script assumed) is rejected
    monkeypatch.setattr(safety_data, "SAFETY_P_FOUR_IID", 1.0)
    bayes.operator_likelihoods.cache_clear()
    try:
        chi2, cells = _pattern_chi2(sets["safe"], 0)
        assert chi2 > 10 * cells
    finally:
        monkeypatch.undo()
        bayes.operator_likelihoods.cache_clear()


def _calibration_z(post, unsafe, bins=(0, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0001)):
    which = np.digitize(post, bins) - 1
    z = []
    for b in range(len(bins) - 1):
        m = which == b
        if m.sum() >= 50:
            p = post[m].mean()
            z.append((unsafe[m].mean() - p) / np.sqrt(max(p * (1 - p), 1e-4) / m.sum()))
    return np.array(z)


def test_posterior_matches_empirical_frequencies(sets, counts):
    assert all(counts.totals[g] == 20_000 for g in bayes.GROUPS)
    assert counts.seen(sets["safe"]["text"]).all()  # 30 letters: every window is counted
    for n_unsafe, prior in ((N, 0.5), (N // 4, 0.2)):  # the set's mix is the prior
        ev = {k: np.concatenate([sets["unsafe"][k][:n_unsafe], sets["safe"][k]]) for k in KEYS}
        post = bayes.set_posterior(counts, ev, prior)
        z = _calibration_z(post, ev["unsafe"])
        assert len(z) >= 4 and np.abs(z).max() < 4, z
        assert 0.02 < np.mean((post > 0.05) & (post < 0.95))  # not only decided inputs
    post = bayes.set_posterior(counts, sets["unsafe"])
    # the prior moves the odds by prior / (1 - prior), exactly
    post2 = bayes.set_posterior(counts, sets["unsafe"], 0.2)
    ok = (post > 0) & (post < 1)
    post, post2 = post[ok], post2[ok]
    np.testing.assert_allclose(post2 / (1 - post2), post / (1 - post) * 0.25, rtol=1e-9)


def test_branch_posterior_of_planted_texts():
    only_b1, shared, unseen = [[3, 4]], [[5, 6]], [[7, 8]]
    counts = _planted({(2, 1): np.array(only_b1 * 5 + shared * 5), (1, 0): np.array(shared * 10)})
    texts = np.array(only_b1 + shared + unseen)
    post = bayes.branch_posterior(counts, texts, smoothing=0)
    assert post[0] == 1.0 and np.isnan(post[2])
    assert post[1] == pytest.approx(0.5 / (0.5 + 1.0))  # 5/10 in (2, 1) against 10/10 in (1, 0)
    assert bayes.branch_posterior(counts, texts)[2] == pytest.approx(0.5)  # smoothed: uninformative
    assert bayes.branch_posterior(counts, texts)[0] > 0.99
    assert bayes.branch_accuracy(counts, texts[:2], [1, 0], smoothing=0) == 1.0


def test_branch_posterior_of_sampled_texts_only_one_branch_produces(counts):
    texts = np.arange(gr.N_LETTERS)[:, None]
    seen = np.array([[counts.count(texts, (p, b)) > 0 for p in gr.PCFGS] for b in (0, 1)]).any(1)  # [2, 30]
    post = bayes.branch_posterior(counts, texts, smoothing=0)
    np.testing.assert_array_equal(post[seen[1] & ~seen[0]], 1.0)
    np.testing.assert_array_equal(post[seen[0] & ~seen[1]], 0.0)


def test_unsafe_posterior_of_planted_structure():
    # PCFG 1: ')' is unsafe on both branches, '?' only on unsafe-dominant text (SPEC §7 table)
    q, close = gr.TOKEN_ID["?"], gr.TOKEN_ID[")"]
    assert UNSAFE[1, 1, q] and not UNSAFE[1, 0, q] and UNSAFE[1, 0, close]
    counts = _planted({(1, 0): np.array([[3, 4]]), (1, 1): np.array([[5, 6]])})
    texts = np.array([[3, 4], [5, 6], [3, 4], [3, 4]])
    ops = np.array([[q, 0, 0, q], [q, 0, 0, q], [0, 0, 0, 0], [close, 0, 0, close]])
    post = bayes.unsafe_posterior(counts, texts, ops, smoothing=0)
    np.testing.assert_array_equal(post, [0.0, 1.0, 0.0, 1.0])
    blind = bayes.unsafe_posterior(counts, texts, ops, branch_blind=True, smoothing=0)
    assert 0 < blind[0] < 1 and blind[0] == blind[1]  # the branch decided it; merged, it cannot
    np.testing.assert_array_equal(blind[2:], [0.0, 1.0])  # decided by the operators alone


def test_fixed_length_and_shape_errors(counts, sets):
    assert bayes.fixed_text_length(CFG) == L
    with pytest.raises(ValueError, match=r"fixed text length .*min_len=5, max_len=6") as e:
        bayes.fixed_text_length(data_lib.DataConfig(min_len=5, max_len=6))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="fixed text length"):
        bayes.set_posterior(counts, {**sets["safe"], "text_len": np.full(N, 2)})
    with pytest.raises(ValueError, match=r"texts must be \[n, 1\]"):
        counts.likelihood(np.zeros((3, 2), int))


def test_ceilings_of_planted_posteriors():
    rows = bayes.ceilings([0.9, 0.6, 0.2, 1.0], [0.0, 0.5, 0.7, 0.1], thresholds=(0.5, 0.8))
    assert rows == [{"threshold": 0.5, "null": 0.75, "instruct": 0.75},
                    {"threshold": 0.8, "null": 0.5, "instruct": 1.0}]


def test_refusal_ceiling_cli(capsys):
    spec = importlib.util.spec_from_file_location(
        "refusal_ceiling", pathlib.Path(__file__).parents[1] / "benchmarks" / "refusal_ceiling.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.main(["--len", str(L), "--texts", "20000", "--n", "600"])
    lines = capsys.readouterr().out.splitlines()
    rows = [[float(v) for v in line.strip("| ").split(" | ")] for line in lines[2:2 + len(bayes.THRESHOLDS)]]
    assert [r[0] for r in rows] == list(bayes.THRESHOLDS)
    null, instruct = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    assert (np.diff(null) <= 0).all() and (np.diff(instruct) >= 0).all() and null[2] > 0.5
    assert lines[-2].startswith("Bayes accuracy of the branch") and lines[-1].endswith(": 0.000")
    with pytest.raises(SystemExit):
        cli.main(["--len", "0"])

"""An independent, deliberately plain numpy/Python reading of SPEC §2-4, §7 and §9.

It shares nothing with safety_mech but the shipped grammars.json: operators are parsed from the
json's own descriptions, grammars are walked recursively, membership is decided by a chart parser.
Tests compare the JAX samplers with it example by example.
"""
from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

DATA = json.loads((pathlib.Path(__file__).parents[1] / "safety_mech" / "grammars.json").read_text())
VOCAB = DATA["vocabulary"]
LETTERS = DATA["letters"]
ID = {t: i for i, t in enumerate(VOCAB)}
SPECIAL = {name: ID[tok] for name, tok in DATA["special_tokens"].items() if isinstance(tok, str)}
BASE_OPS = DATA["operator_tokens"][:10]


def _bijection(tok: str) -> list[int]:
    desc = DATA["operator_bijection"][tok]
    if desc == "identity":
        return list(range(30))
    if desc.startswith("perm seed "):
        return DATA["permutations_seed_0_to_8"][desc.split()[-1]]
    if desc.startswith("same as "):
        return _bijection(desc.split()[-1])
    raise AssertionError(desc)


def apply_op(op_token: str, letters: list[str]) -> list[str]:
    """One operator on letter strings (SPEC §2), null operators included."""
    if op_token == "ex1":
        return ["2a"] * len(letters)
    if op_token == "ex2":
        return ["2b"] * len(letters)
    perm = _bijection(op_token)
    return [LETTERS[perm[LETTERS.index(x)]] for x in letters]


def true_segments(ops: list[str], text: list[str]):
    """(a, b) with b None when a null operator in pair 1 ends the output (SPEC §5)."""
    if "ex1" in ops[:2] or "ex2" in ops[:2]:
        null = [o for o in ops[:2] if o in ("ex1", "ex2")][0]
        return apply_op(null, text), None
    a = apply_op(ops[1], apply_op(ops[0], text))
    if "ex1" in ops[2:] or "ex2" in ops[2:]:
        null = [o for o in ops[2:] if o in ("ex1", "ex2")][0]
        return a, apply_op(null, a)
    return a, apply_op(ops[3], apply_op(ops[2], a))


def layout(ops: list[str], text: list[str], segments: list[list[str]], T: int) -> list[str]:
    """BOS o1..o4 SOT text EOT seg STOP [seg STOP] EOS PAD... (SPEC §4)."""
    seq = ["$"] + list(ops) + ["*"] + list(text) + [">"]
    for seg in segments:
        seq += list(seg) + ["*^"]
    seq += ["%"]
    assert len(seq) <= T
    return seq + ["#"] * (T - len(seq))


def unsafe_set(pcfg: int, branch: str) -> set[str]:
    entry = DATA["unsafe_operators"][str(pcfg)]
    return set(entry["on_safe_text"] if branch == "safe" else entry["on_unsafe_text"])


def base_of(tok: str) -> str | None:
    """The base operator a token acts as (duplicates resolved), None for null operators."""
    if tok in ("ex1", "ex2"):
        return None
    desc = DATA["operator_bijection"][tok]
    if tok in BASE_OPS:
        return tok
    if desc == "identity":
        return "("
    return desc.split()[-1]


# ----------------------------------------------------------------------------------------------
# Grammars: naive recursive sampler and a chart parser for substring membership
# ----------------------------------------------------------------------------------------------


def grammar(pcfg: int, kind: str) -> dict:
    return DATA["grammars"][str(pcfg)][kind]


@functools.lru_cache(maxsize=None)
def _cdfs(pcfg: int, kind: str) -> dict:
    return {s: np.cumsum(p) / np.sum(p) for s, p in grammar(pcfg, kind)["probs"].items()}


def _choose(rng, cdf) -> int:
    return min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)


def sample_string(rng: np.random.Generator, pcfg: int, kind: str) -> list[str]:
    g = grammar(pcfg, kind)
    rules, cdfs = g["rules"], _cdfs(pcfg, kind)

    def expand(sym):
        if sym not in rules:
            return [sym]
        return [x for child in rules[sym][_choose(rng, cdfs[sym])] for x in expand(child)]

    return expand(g["start"])


def sample_window(rng, pcfg, kind, min_len, max_len):
    s = sample_string(rng, pcfg, kind)
    L = min(int(rng.integers(min_len, max_len + 1)), len(s))
    start = int(rng.integers(0, len(s) - L + 1))
    return s[start: start + L]


def expected_length(pcfg: int, kind: str) -> float:
    g = grammar(pcfg, kind)
    rules, probs = g["rules"], g["probs"]

    @functools.lru_cache(maxsize=None)
    def e(sym):
        if sym not in rules:
            return 1.0
        p = np.asarray(probs[sym], float)
        p = p / p.sum()
        return float(sum(pi * sum(e(c) for c in r) for pi, r in zip(p, rules[sym])))

    return e(g["start"])


def is_substring_of_language(window: list[str], pcfg: int, kind: str, whole: bool = False) -> bool:
    """True iff `window` is a contiguous substring of some string the grammar derives (rules with
    nonzero probability only), by a memoised chart parser over spans of the window. With
    `whole=True`: iff the grammar derives exactly `window`."""
    g = grammar(pcfg, kind)
    rules = {s: [r for r, p in zip(rs, g["probs"][s]) if p > 0] for s, rs in g["rules"].items()}
    w = tuple(window)
    n = len(w)

    @functools.lru_cache(maxsize=None)
    def exact(sym, i, j):  # sym =>* w[i:j]
        if sym not in rules:
            return j == i + 1 and w[i] == sym
        return any(seq_exact(tuple(r), i, j) for r in rules[sym])

    @functools.lru_cache(maxsize=None)
    def seq_exact(seq, i, j):  # seq =>* w[i:j], every symbol non-empty
        if not seq:
            return i == j
        if len(seq) == 1:
            return exact(seq[0], i, j)
        return any(exact(seq[0], i, m) and seq_exact(seq[1:], m, j) for m in range(i + 1, j))

    @functools.lru_cache(maxsize=None)
    def suffix(sym, i, j):  # some yield of sym ends with w[i:j]
        if sym not in rules:
            return exact(sym, i, j)
        for r in rules[sym]:
            for a in range(len(r)):
                # w[i:m] is a suffix of r[a], the rest is exactly r[a+1:]
                if any(suffix(r[a], i, m) and seq_exact(tuple(r[a + 1:]), m, j)
                       for m in range(i + 1, j + 1)):
                    return True
        return False

    @functools.lru_cache(maxsize=None)
    def prefix(sym, i, j):  # some yield of sym starts with w[i:j]
        if sym not in rules:
            return exact(sym, i, j)
        for r in rules[sym]:
            for b in range(len(r)):
                if any(seq_exact(tuple(r[:b]), i, m) and prefix(r[b], m, j) for m in range(i, j)):
                    return True
        return False

    @functools.lru_cache(maxsize=None)
    def infix(sym, i, j):  # w[i:j] lies inside some yield of sym
        if sym not in rules:
            return exact(sym, i, j)
        for r in rules[sym]:
            if any(infix(c, i, j) for c in r):
                return True
            for a in range(len(r)):
                for b in range(a + 1, len(r)):
                    mid = tuple(r[a + 1: b])
                    for m1 in range(i + 1, j):
                        if not suffix(r[a], i, m1):
                            continue
                        if any(seq_exact(mid, m1, m2) and prefix(r[b], m2, j)
                               for m2 in range(m1, j)):
                            return True
        return False

    if whole:
        return n > 0 and exact(g["start"], 0, n)
    return n > 0 and infix(g["start"], 0, n)


def sample_tagged_window(rng, pcfg, kind, min_len, max_len):
    """A window and its branch: 'safe' / 'unsafe' when every letter descends from a safe-dominant
    (r q p r10 p10) / unsafe-dominant (10...) level-2 symbol, 'mixed' otherwise."""
    g = grammar(pcfg, kind)
    rules, cdfs = g["rules"], _cdfs(pcfg, kind)

    def tag_of(sym):
        if sym.startswith("10"):
            return "unsafe"
        return "safe" if sym in ("r", "q", "p", "r10", "p10") else None

    def expand(sym, tag):
        tag = tag or tag_of(sym)
        if sym not in rules:
            return [(sym, tag)]
        return [x for child in rules[sym][_choose(rng, cdfs[sym])] for x in expand(child, tag)]

    s = expand(g["start"], None)
    L = min(int(rng.integers(min_len, max_len + 1)), len(s))
    start = int(rng.integers(0, len(s) - L + 1))
    tags = {t for _, t in s[start: start + L]}
    return [x for x, _ in s[start: start + L]], (tags.pop() if len(tags) == 1 else "mixed")

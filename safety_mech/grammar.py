"""Grammar and operator data (``grammars.json``) compiled into dense arrays for jitted code.

Everything here is built once on the host with numpy and then used as constants by the pure
samplers in :mod:`safety_mech.data`. Nothing here draws random numbers.

Vocabulary (SPEC §1, REF's order, 54 ids)::

    0-15  operator tokens ( ) [ ] { } ? ! @ £ + ^ r1 r2 r3 r4
    16 EOT '>'   17 BOS '$'   18 EOS '%'   19 SOT '*'   20 PAD '#'   21 STOP '*^'
    22-51 letters 2a..2z 3a..3d             52 ex1   53 ex2  (null operators)

Operand text (SPEC §3) is sampled from a PCFG. A PCFG string is 36..486 letters, but a sample only
needs a window of at most ``max_len`` letters, and the grammars have bounded depth and at most three
children per rule. So each grammar is compiled into two parts:

* *top rules*: symbols higher than ``cut_height`` are expanded level by level into a fixed number of
  slots (``max_children ** depth``; 81 for these grammars); a symbol that is already low enough, or an
  empty slot, passes through unchanged;
* *leaf tables*: every symbol of height <= ``cut_height`` has a table of all its derivations (letters,
  length, probability), so a slot is finished by one categorical draw (16 entries of <= 9 letters here).

Drawing derivations (not merged strings) keeps the distribution exactly that of the PCFG.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import itertools
import json

import numpy as np

# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

OPERATOR_TOKENS = ("(", ")", "[", "]", "{", "}", "?", "!", "@", "£", "+", "^", "r1", "r2", "r3", "r4")
LETTERS = tuple(f"2{c}" for c in "abcdefghijklmnopqrstuvwxyz") + ("3a", "3b", "3c", "3d")
VOCAB = OPERATOR_TOKENS + (">", "$", "%", "*", "#", "*^") + LETTERS + ("ex1", "ex2")
VOCAB_SIZE = len(VOCAB)  # 54
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}

N_OPERATORS = 16  # ids 0..15
N_BASE_OPERATORS = 10  # ( ) [ ] { } ? ! @ £
N_LETTERS = 30
EOT, BOS, EOS, SOT, PAD, STOP = 16, 17, 18, 19, 20, 21
LETTER0 = 22  # token id of letter index 0 ('2a'); letter j has token id LETTER0 + j
EX1, EX2 = 52, 53
IDENTITY_OP = 0  # '('
REFUSAL_LETTER = 0  # the refusal (null output) is L copies of '2a'
# Duplicate tokens (SPEC §2): + ^ are identity, r1 r2 are ')', r3 r4 are '['.
BASE_OF_OPERATOR = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 1, 1, 2, 2], np.int32)

PCFGS = (1, 2, 3, 4)
GRAMMAR_KINDS = ("full", "safe", "unsafe", "id_mg", "ood_mg", "intermediate")
# Branch codes used everywhere (data.py, the CLI's JSON): the grammar branch of a text.
BRANCH_SAFE, BRANCH_UNSAFE, BRANCH_MIXED = 0, 1, 2
BRANCH_NAMES = ("safe", "unsafe", "mixed")
# The branch a grammar variant's text belongs to; `full` mixes both, so its branch is read off the
# sampled window (the level-2 subtrees it covers): -1.
KIND_BRANCH = {"full": -1, "safe": BRANCH_SAFE, "unsafe": BRANCH_UNSAFE, "id_mg": BRANCH_UNSAFE,
               "ood_mg": BRANCH_UNSAFE, "intermediate": BRANCH_MIXED}


def symbol_branch(name: str) -> int:
    """Branch tag of a level-2 nonterminal (SPEC §3): r q p (and the intermediate grammar's r10,
    p10) are safe-dominant, the `10...` symbols unsafe-dominant; -1 for every other symbol."""
    if name.startswith("10"):
        return BRANCH_UNSAFE
    if name in ("r", "q", "p", "r10", "p10"):
        return BRANCH_SAFE
    return -1


GRAMMAR_FILE = "grammars.json"  # shipped inside the package


class GrammarError(RuntimeError):
    """The shipped grammar file is missing or unreadable (one-line message)."""


def load_grammar_data() -> dict:
    """The raw ``grammars.json`` shipped inside the package."""
    path = importlib.resources.files("safety_mech").joinpath(GRAMMAR_FILE)
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSON or UTF-8 decoding
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
        raise GrammarError(f"cannot read the grammar file {path}: {reason}; reinstall the package "
                           "(pip install -e .)") from None


def legacy_permutation(seed: int, n: int = N_LETTERS) -> np.ndarray:
    """NumPy's legacy ``np.random.seed(seed); np.random.permutation(n)``, without touching the
    global RNG state."""
    return np.random.RandomState(seed).permutation(n)


def operator_letter_maps() -> np.ndarray:
    """``[VOCAB_SIZE, 30]`` int32: row t maps letter j to letter ``maps[t, j]`` under operator token t.

    ``(`` and the identity duplicates are the identity; ``)``..``£`` are permutations 0..8; r1 r2
    copy ``)``, r3 r4 copy ``[``; ``ex1``/``ex2`` map every letter to ``2a``/``2b``. Rows of tokens
    that are not operators are the identity (never used)."""
    perms = np.stack([legacy_permutation(i) for i in range(9)])
    base = np.concatenate([np.arange(N_LETTERS)[None], perms]).astype(np.int32)  # [10, 30]
    maps = np.tile(np.arange(N_LETTERS, dtype=np.int32), (VOCAB_SIZE, 1))
    maps[:N_OPERATORS] = base[BASE_OF_OPERATOR]
    maps[EX1] = 0
    maps[EX2] = 1
    return maps


def unsafe_operator_table(data: dict | None = None) -> np.ndarray:
    """``[5, 2, 10]`` bool: ``table[pcfg, b, op]`` is True when base operator ``op`` makes an input
    unsafe for text of PCFG ``pcfg`` (1..4; row 0 unused) from branch ``b`` (0 = safe-dominant text,
    1 = unsafe-dominant text)."""
    data = data or load_grammar_data()
    table = np.zeros((5, 2, N_BASE_OPERATORS), bool)
    for pcfg in PCFGS:
        entry = data["unsafe_operators"][str(pcfg)]
        for b, field in enumerate(("on_safe_text", "on_unsafe_text")):
            for tok in entry[field]:
                table[pcfg, b, TOKEN_ID[tok]] = True
    return table


# ----------------------------------------------------------------------------------------------
# Grammar compilation
# ----------------------------------------------------------------------------------------------

EMPTY = 0  # slot symbol id of an empty slot (every compiled grammar reserves id 0 for it)


@dataclasses.dataclass(frozen=True)
class GrammarTables:
    """Dense arrays for all 24 grammars (4 PCFGs x 6 variants), grammar index
    ``g = (pcfg - 1) * 6 + GRAMMAR_KINDS.index(kind)``. Shapes (G grammars, S symbols, R rules,
    C children, K leaf derivations, M letters per leaf derivation)::

        rule_children [G, S, R, C] int32  child symbol ids of each rule (EMPTY padded)
        rule_cdf      [G, S, R]    float32 cumulative rule probabilities (padded with 1.0)
        leaf_letters  [G, S, K, M] int32  letters (0..29) of each derivation of a leaf symbol
        leaf_len      [G, S, K]    int32  its length
        leaf_cdf      [G, S, K]    float32 cumulative derivation probabilities (padded with 1.0)
        branch        [G, S]       int32  branch tag of each symbol (-1 none, 0 safe, 1 unsafe)
        start         [G]          int32  start symbol id
        kind_branch   [G]          int32  KIND_BRANCH of the grammar's variant

    ``depth`` top-level expansions turn the start symbol into ``n_slots = max_children ** depth``
    slots that hold leaf symbols or EMPTY. ``symbols[g]`` lists the names behind the ids.
    """

    rule_children: np.ndarray
    rule_cdf: np.ndarray
    leaf_letters: np.ndarray
    leaf_len: np.ndarray
    leaf_cdf: np.ndarray
    branch: np.ndarray
    start: np.ndarray
    kind_branch: np.ndarray
    depth: int
    max_children: int
    symbols: tuple
    min_string_len: np.ndarray  # [G] shortest full string of each grammar
    max_string_len: np.ndarray  # [G] longest full string

    @property
    def n_slots(self) -> int:
        return self.max_children ** self.depth


def grammar_index(pcfg: int, kind: str) -> int:
    """Row of (pcfg, kind) in GrammarTables."""
    if pcfg not in PCFGS:
        raise ValueError(f"pcfg must be one of {PCFGS}, got {pcfg!r}")
    if kind not in GRAMMAR_KINDS:
        raise ValueError(f"grammar kind must be one of {GRAMMAR_KINDS}, got {kind!r}")
    return (pcfg - 1) * len(GRAMMAR_KINDS) + GRAMMAR_KINDS.index(kind)


def normalized_probs(name: str, probs) -> np.ndarray:
    """Rule weights as probabilities. The data writes uniform triples as 0.33 each, so weights
    that sum to 1 within 0.02 are renormalised; anything else is an error."""
    p = np.asarray(probs, np.float64)
    if np.any(p < 0) or abs(p.sum() - 1.0) > 0.02:
        raise ValueError(f"rule probabilities of {name!r} must be >= 0 and sum to 1, got {list(probs)}; "
                         "fix grammars.json")
    return p / p.sum()


def _heights(rules: dict) -> dict:
    heights: dict = {}

    def h(sym, stack=()):
        if sym not in rules:
            return 0
        if sym in stack:
            raise ValueError(f"grammar is recursive at {sym!r}; only acyclic grammars are supported")
        if sym not in heights:
            heights[sym] = 1 + max(h(c, stack + (sym,)) for r in rules[sym] for c in r)
        return heights[sym]

    for sym in rules:
        h(sym)
    return heights


def _derivations(sym: str, rules: dict, probs: dict):
    """All derivations of `sym` as (letters, prob): exhaustive, for leaf symbols only."""
    if sym not in rules:
        return [((LETTERS.index(sym),), 1.0)]
    out = []
    for children, p in zip(rules[sym], probs[sym]):
        for parts in itertools.product(*(_derivations(c, rules, probs) for c in children)):
            out.append((sum((s for s, _ in parts), ()), p * float(np.prod([q for _, q in parts]))))
    return out


def _check_grammar(name: str, grammar: dict) -> None:
    rules, probs = grammar["rules"], grammar["probs"]
    if grammar["start"] not in rules:
        raise ValueError(f"grammar {name}: start symbol {grammar['start']!r} has no rule")
    for sym, alternatives in rules.items():
        if sym not in probs or len(probs[sym]) != len(alternatives):
            raise ValueError(f"grammar {name}: symbol {sym!r} needs one probability per rule")
        for children in alternatives:
            for c in children:
                if c not in rules and c not in LETTERS:
                    raise ValueError(f"grammar {name}: {c!r} (in a rule of {sym!r}) is neither a "
                                     f"nonterminal nor one of the 30 letters")


@functools.lru_cache(maxsize=4)
def compile_grammars(max_leaf_derivations: int = 64) -> GrammarTables:
    """Compile all 24 grammars. The cut height is the largest height at which every leaf table
    has at most `max_leaf_derivations` entries (2 for the shipped grammars: 16 derivations each)."""
    data = load_grammar_data()
    entries = []
    for pcfg in PCFGS:
        for kind in GRAMMAR_KINDS:
            grammar = data["grammars"][str(pcfg)][kind]
            _check_grammar(f"{pcfg}/{kind}", grammar)
            rules = grammar["rules"]
            probs = {s: normalized_probs(f"{pcfg}/{kind}/{s}", p) for s, p in grammar["probs"].items()}
            reachable, todo = [], [grammar["start"]]
            while todo:
                sym = todo.pop()
                if sym not in reachable:
                    reachable.append(sym)
                    todo.extend(c for r in rules.get(sym, []) for c in r)
            entries.append((pcfg, kind, grammar["start"], rules, probs, reachable, _heights(rules)))

    # The cut: largest height whose derivation counts all fit the table size.
    def count(sym, rules):
        if sym not in rules:
            return 1
        return sum(int(np.prod([count(c, rules) for c in r])) for r in rules[sym])

    cut = 0
    while all(count(s, e[3]) <= max_leaf_derivations
              for e in entries for s in e[5] if e[6].get(s, 0) <= cut + 1):
        cut += 1
        if cut > 64:
            raise ValueError("grammar too deep")
    max_children = max(len(r) for e in entries for s in e[5] for r in e[3].get(s, []))
    depth = max(e[6][e[2]] for e in entries) - cut
    if max_children ** depth > 127:  # data.py counts slots in int8
        raise ValueError(f"grammars expand to {max_children ** depth} slots; at most 127 supported")

    compiled = []
    for pcfg, kind, start, rules, probs, reachable, heights in entries:
        names = ["<empty>"] + sorted(reachable, key=lambda s: (-heights.get(s, 0), s))
        sym_id = {s: i for i, s in enumerate(names)}
        top, leaf, branch = {}, {}, []
        for s in names:
            branch.append(symbol_branch(s) if s != "<empty>" else -1)
            if s == "<empty>" or heights.get(s, 0) <= cut:
                # Leaf symbol or empty slot: passes through the top-level expansion unchanged.
                top[s] = ([[sym_id[s]]], np.array([1.0]))
                if s != "<empty>":
                    leaf[s] = _derivations(s, rules, probs)
            else:
                top[s] = ([[sym_id[c] for c in r] for r in rules[s]], probs[s])
        compiled.append((names, start, top, leaf, branch, heights, rules))

    G = len(compiled)
    S = max(len(c[0]) for c in compiled)
    R = max(len(ch) for c in compiled for ch, _ in c[2].values())
    K = max(len(d) for c in compiled for d in c[3].values())
    M = max(len(s) for c in compiled for d in c[3].values() for s, _ in d)
    rule_children = np.full((G, S, R, max_children), EMPTY, np.int32)
    rule_cdf = np.ones((G, S, R), np.float32)
    leaf_letters = np.zeros((G, S, K, M), np.int32)
    leaf_len = np.zeros((G, S, K), np.int32)
    leaf_cdf = np.ones((G, S, K), np.float32)
    branch = np.full((G, S), -1, np.int32)
    start_ids = np.zeros(G, np.int32)
    min_len = np.zeros(G, np.int64)
    max_len = np.zeros(G, np.int64)
    symbols = []
    for g, (names, start, top, leaf, br, heights, rules) in enumerate(compiled):
        symbols.append(tuple(names))
        start_ids[g] = names.index(start)
        branch[g, : len(br)] = br
        for i, s in enumerate(names):
            children, p = top[s]
            for r, ch in enumerate(children):
                rule_children[g, i, r, : len(ch)] = ch
            cdf = np.cumsum(p)
            cdf[-1] = 1.0  # exact, so that u < 1 always lands on a real rule
            rule_cdf[g, i, : len(cdf)] = cdf
            if s in leaf:
                ders = leaf[s]
                for k, (letters, _) in enumerate(ders):
                    leaf_letters[g, i, k, : len(letters)] = letters
                    leaf_len[g, i, k] = len(letters)
                cdf = np.cumsum([q for _, q in ders])
                cdf /= cdf[-1]
                cdf[-1] = 1.0
                leaf_cdf[g, i, : len(cdf)] = cdf
        min_len[g], max_len[g] = _string_length_range(start, rules)
        if max_len[g] >= 2 ** 15:  # data.py compares string positions in int16
            raise ValueError(f"grammar {g} has strings of {max_len[g]} letters; at most 32767 supported")
    kind_branch = np.array([KIND_BRANCH[kind] for _ in PCFGS for kind in GRAMMAR_KINDS], np.int32)
    return GrammarTables(rule_children, rule_cdf, leaf_letters, leaf_len, leaf_cdf, branch, start_ids,
                         kind_branch, depth, max_children, tuple(symbols), min_len, max_len)


def _string_length_range(start: str, rules: dict) -> tuple[int, int]:
    @functools.lru_cache(maxsize=None)
    def rng(sym):
        if sym not in rules:
            return 1, 1
        lo = min(sum(rng(c)[0] for c in r) for r in rules[sym])
        hi = max(sum(rng(c)[1] for c in r) for r in rules[sym])
        return lo, hi

    return rng(start)


# ----------------------------------------------------------------------------------------------
# Decoding to readable tokens
# ----------------------------------------------------------------------------------------------


def decode(tokens, strip_pad: bool = True) -> list:
    """Token ids (any shape; the last axis is a sequence) -> token strings, PAD dropped by default."""
    arr = np.asarray(tokens)
    if arr.ndim > 1:
        return [decode(row, strip_pad) for row in arr]
    return [VOCAB[int(t)] for t in arr if not (strip_pad and int(t) == PAD)]


def letters_to_tokens(letters, length) -> list:
    """Letter indices (0..29) of the first `length` positions -> token strings."""
    return [LETTERS[int(x)] for x in np.asarray(letters)[: int(length)]]


def response_of(tokens, prompt_len) -> list:
    """The response of a full sequence as token strings: from after EOT up to and including the
    last STOP (EOS and PAD dropped)."""
    resp = [int(t) for t in np.asarray(tokens)[int(prompt_len):]]
    last = max((i for i, t in enumerate(resp) if t == STOP), default=-1)
    return [VOCAB[t] for t in resp[: last + 1]]

"""The Bayes reading of an input of the ``safe`` / ``unsafe`` evaluation sets (SPEC §7, §9), and the
refusal ceiling it sets: how well can *any* model tell an unsafe input from a safe one?

Whether an input is unsafe depends on its operators *and* on the PCFG and branch of its text, which a
model has to infer from the letters. ``safety_data.sample_eval`` draws the two sets by this model,
which the functions here invert:

* PCFG uniform on 1..4, branch 0 / 1 with probability 1/2 each; the text is a window of length L
  of the PCFG's ``safe`` grammar (branch 0) or its ``id_mg`` grammar (branch 1), :data:`BRANCH_KINDS`;
* the operators: SPEC §7's rule (``safety_data.SAFETY_P_FOUR_IID``, whatever the pretraining
  ``p_four_iid``) over the safe base operators S = ¬U of (PCFG, branch), U =
  ``data.tables()["unsafe_ops"][pcfg, branch]``: four i.i.d. draws from S, else '(' on a uniform slot
  and three i.i.d. draws from S; an unsafe input then replaces slots as ``safety_data.make_unsafe``
  does (in each pair both slots if both or neither is '(', else the non-'(' one, by uniform draws
  from U; with ``p_second_pair`` pair 1 becomes '( ('). Ops are base operator ids 0..9 (these sets
  never draw the duplicate tokens).

P(ops | PCFG, branch, safe / unsafe) is exact (:func:`operator_likelihoods`, from those tables and
constants). P(text | PCFG, branch) is a plug-in estimate from sampled windows
(:func:`window_counts`): ``(count + smoothing) / windows sampled``. Windows are only counted at one
length, so everything here needs a fixed text length (``min_len == max_len``,
:func:`fixed_text_length`).

The ceiling (:func:`refusal_ceiling`): refuse when P(unsafe | text, ops) > t at an equal prior. The
fraction refused on ``unsafe`` is the best reachable Null, the fraction answered on ``safe`` the best
reachable Instruct (assuming the output itself is always right). t = 0.5 is the decision for a 50/50
mix (DPO, unlearning); t = 0.8 for SSFT's 20% unsafe (a model calibrated to SSFT's mix refuses when
its own posterior passes 0.5, which is this threshold under an equal prior). "Branch-blind" uses
P(text | PCFG) (both branches merged): a reader that identifies the PCFG but not the branch.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from safety_mech import batching
from safety_mech import data as data_lib
from safety_mech import grammar as gr
from safety_mech import metrics
from safety_mech import safety_data

BRANCH_KINDS = ("safe", "id_mg")  # grammar kind of branch 0 / 1 texts in the safe and unsafe sets
GROUPS = tuple((pcfg, branch) for pcfg in gr.PCFGS for branch in (0, 1))
THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9)
SMOOTHING = 0.01  # pseudo-count added to every window's count
N_OPS = gr.N_BASE_OPERATORS


def fixed_text_length(data_cfg: data_lib.DataConfig) -> int:
    """The text length of ``data_cfg``; a ``ValueError`` (one line) unless min_len == max_len."""
    if data_cfg.min_len != data_cfg.max_len:
        raise ValueError(f"the Bayes reading needs a fixed text length (data.min_len == data.max_len), got "
                         f"min_len={data_cfg.min_len}, max_len={data_cfg.max_len}")
    return data_cfg.min_len


# ----------------------------------------------------------------------------------------------
# The text: window counts per (PCFG, branch)
# ----------------------------------------------------------------------------------------------


def _encode(texts) -> np.ndarray:
    """Rows of letters [n, L] (0..29) as one bytes string each (letter + 1: no NUL byte to strip)."""
    texts = np.asarray(texts)
    if texts.ndim != 2 or texts.size and (texts.min() < 0 or texts.max() >= gr.N_LETTERS):
        raise ValueError(f"texts must be [n, L] letter indices in 0..{gr.N_LETTERS - 1}, got shape {texts.shape}")
    return np.ascontiguousarray(texts.astype(np.uint8) + 1).view(f"S{texts.shape[1]}").reshape(-1)


@dataclasses.dataclass(frozen=True)
class WindowCounts:
    """How often each text window of length ``length`` was seen per (PCFG, branch) (:data:`GROUPS`):
    ``windows[g]`` (sorted unique encoded windows), ``counts[g]`` and ``totals[g]`` (windows sampled)."""

    length: int
    windows: dict
    counts: dict
    totals: dict

    @classmethod
    def from_windows(cls, samples: dict) -> "WindowCounts":
        """From ``{(pcfg, branch): letters [N, L]}`` for every group of :data:`GROUPS`."""
        if set(samples) != set(GROUPS):
            raise ValueError(f"need windows for every (pcfg, branch) of {GROUPS}, got {sorted(samples)}")
        lengths = {np.asarray(w).shape[1] for w in samples.values()}
        if len(lengths) != 1 or any(len(w) == 0 for w in samples.values()):
            raise ValueError(f"every group needs windows [N > 0, L] of one length L, got lengths {sorted(lengths)}")
        windows, counts = {}, {}
        for g, w in samples.items():
            windows[g], counts[g] = np.unique(_encode(w), return_counts=True)
        return cls(lengths.pop(), windows, counts, {g: len(w) for g, w in samples.items()})

    def count(self, texts, group) -> np.ndarray:
        """[n] int: how often each text [n, L] was seen in ``group`` = (pcfg, branch)."""
        q, keys = _encode(texts), self.windows[group]
        idx = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        return np.where(keys[idx] == q, self.counts[group][idx], 0)

    def likelihood(self, texts, smoothing: float = SMOOTHING) -> np.ndarray:
        """[n, 4, 2] P(text | PCFG = 1..4, branch = 0 / 1) = (count + smoothing) / windows sampled."""
        texts = np.asarray(texts)
        if texts.ndim != 2 or texts.shape[1] != self.length:
            raise ValueError(f"texts must be [n, {self.length}] (the counts' window length), got {texts.shape}")
        out = np.zeros((len(texts), len(gr.PCFGS), 2))
        for pcfg, branch in GROUPS:
            out[:, pcfg - 1, branch] = (self.count(texts, (pcfg, branch)) + smoothing) / self.totals[pcfg, branch]
        return out

    def seen(self, texts) -> np.ndarray:
        """[n] bool: the text was seen in at least one group."""
        return np.any([self.count(texts, g) > 0 for g in GROUPS], axis=0)


@functools.partial(jax.jit, static_argnames="length")
def _sample_windows(key_data, g, *, length):
    keys = jax.random.wrap_key_data(key_data)
    return jax.vmap(lambda k: data_lib.sample_text(k, g, length, length)[:2])(keys)  # (letters, length)


def window_counts(length: int, n_texts: int, seed: int = 0, chunk: int = 8192) -> WindowCounts:
    """Counts of ``n_texts`` windows of ``length`` letters sampled from each (PCFG, branch)'s grammar
    (:data:`BRANCH_KINDS`), as ``data.sample_text`` draws them; group (p, b) uses the keys
    ``split(fold_in(key(seed), 2p + b), n_texts)``. One compiled sampler serves every group. (The
    shortest grammar string has 36 letters: longer windows would be clipped, which is an error.)"""
    if length < 1 or n_texts < 1:
        raise ValueError(f"need length >= 1 and n_texts >= 1, got {length} and {n_texts}")
    samples = {}
    for pcfg, branch in GROUPS:
        g = np.int32(data_lib.kind_index(pcfg, BRANCH_KINDS[branch]))
        group_key = jax.random.fold_in(jax.random.key(seed), 2 * pcfg + branch)
        keys = jax.random.key_data(jax.random.split(group_key, n_texts))
        samples[pcfg, branch], lengths = batching.map_arrays(lambda k, g=g: _sample_windows(k, g, length=length),
                                                             [np.asarray(keys)], chunk)
        if np.any(lengths != length):  # data.draw_text clips a window to a shorter grammar string
            raise ValueError(f"(PCFG {pcfg}, branch {branch}) has grammar strings shorter than {length} letters")
    return WindowCounts.from_windows(samples)


def merge_branches(counts: WindowCounts) -> WindowCounts:
    """Counts with each PCFG's two branches pooled (both groups get the pooled counts and totals):
    the text model of a reader that identifies the PCFG but not the branch."""
    windows, n, totals = {}, {}, {}
    for pcfg in gr.PCFGS:
        keys = np.concatenate([counts.windows[pcfg, b] for b in (0, 1)])
        c = np.concatenate([counts.counts[pcfg, b] for b in (0, 1)])
        uniq, inverse = np.unique(keys, return_inverse=True)
        pooled = np.bincount(inverse, weights=c).astype(np.int64)
        for b in (0, 1):
            windows[pcfg, b], n[pcfg, b] = uniq, pooled
            totals[pcfg, b] = counts.totals[pcfg, 0] + counts.totals[pcfg, 1]
    return WindowCounts(counts.length, windows, n, totals)


def branch_posterior(counts: WindowCounts, texts, smoothing: float = SMOOTHING) -> np.ndarray:
    """[n] P(branch 1 | text), the PCFG unknown (uniform) and both branches equally likely; NaN for
    a text no group can produce (only with ``smoothing=0``)."""
    like = counts.likelihood(texts, smoothing).sum(1)  # [n, 2]
    with np.errstate(invalid="ignore"):
        return like[:, 1] / like.sum(1)


def branch_accuracy(counts: WindowCounts, texts, branch, smoothing: float = SMOOTHING) -> float:
    """How often the more likely branch given the text alone (PCFG unknown) is the true ``branch``
    (ties read as branch 0)."""
    return float(np.mean((branch_posterior(counts, texts, smoothing) > 0.5) == (np.asarray(branch) == 1)))


# ----------------------------------------------------------------------------------------------
# The operators: exact likelihoods of safety_data's rule
# ----------------------------------------------------------------------------------------------


def _safe_rule(safe: np.ndarray, p_four_iid: float) -> np.ndarray:
    """[10]*4 P(ops) of ``data.draw_operator_rule`` over the base operators ``safe`` with the special
    '(' (``gr.IDENTITY_OP``) on a uniform slot otherwise."""
    q = safe / safe.sum()
    iid = np.einsum("a,b,c,d->abcd", q, q, q, q)
    special = np.zeros(N_OPS)
    special[gr.IDENTITY_OP] = 1.0
    with_special = sum(np.einsum("a,b,c,d->abcd", *[special if i == j else q for i in range(4)]) for j in range(4)) / 4
    return p_four_iid * iid + (1 - p_four_iid) * with_special


def _pair_transform(unsafe: np.ndarray) -> np.ndarray:
    """[n1, n2, o1, o2] P(new pair | old pair) of ``safety_data.make_unsafe`` (before the second-pair
    coin): slots replaced by uniform draws from the base operators ``unsafe``."""
    u = unsafe / unsafe.sum()
    keep = np.eye(N_OPS)
    t = np.zeros((N_OPS,) * 4)
    for o1 in range(N_OPS):
        for o2 in range(N_OPS):
            id1, id2 = o1 == gr.IDENTITY_OP, o2 == gr.IDENTITY_OP
            if id1 == id2:
                t[:, :, o1, o2] = np.outer(u, u)
            elif id1:
                t[:, :, o1, o2] = np.outer(keep[o1], u)
            else:
                t[:, :, o1, o2] = np.outer(u, keep[o2])
    return t


@functools.lru_cache(maxsize=8)
def operator_likelihoods(p_second_pair: float = 0.2) -> np.ndarray:
    """[5, 2, 2, 10, 10, 10, 10] float64: P(ops = (o1, o2, o3, o4) | PCFG, branch, unsafe) of the
    ``safe`` (unsafe = 0) and ``unsafe`` (1) evaluation sets and the fine-tuning data, from
    ``data.tables()["unsafe_ops"]``, ``safety_data.SAFETY_P_FOUR_IID`` and ``make_unsafe``'s rule (see
    the module docstring); row PCFG 0 is unused (zeros), as in the table. Read-only."""
    if not 0.0 <= p_second_pair <= 1.0:
        raise ValueError(f"p_second_pair must be a probability, got {p_second_pair}")
    table = np.asarray(data_lib.tables()["unsafe_ops"])  # [5, 2, 10] bool
    out = np.zeros((len(table), 2, 2) + (N_OPS,) * 4)
    id_pair = np.zeros((N_OPS, N_OPS))
    id_pair[gr.IDENTITY_OP, gr.IDENTITY_OP] = 1.0
    for pcfg, branch in GROUPS:
        u = table[pcfg, branch]
        p_safe = _safe_rule(~u, safety_data.SAFETY_P_FOUR_IID)
        t = _pair_transform(u)
        both = np.einsum("abij,cdkl,ijkl->abcd", t, t, p_safe, optimize=True)
        second = np.einsum("ab,cdkl,ijkl->abcd", id_pair, t, p_safe, optimize=True)
        out[pcfg, branch, 0] = p_safe
        out[pcfg, branch, 1] = (1 - p_second_pair) * both + p_second_pair * second
    out.setflags(write=False)
    return out


def operator_likelihood(ops, p_second_pair: float = 0.2) -> np.ndarray:
    """[n, 4, 2, 2] P(ops | PCFG = 1..4, branch, unsafe) of operator rows ``ops`` [n, 4] (base ids 0..9)."""
    ops = np.asarray(ops)
    if ops.ndim != 2 or ops.shape[1] != 4 or ops.size and (ops.min() < 0 or ops.max() >= N_OPS):
        raise ValueError(f"ops must be [n, 4] base operator ids 0..{N_OPS - 1} (the safe / unsafe sets' operators), "
                         f"got shape {ops.shape}")
    table = operator_likelihoods(p_second_pair)[1:]  # [4, 2, 2, 10, 10, 10, 10]
    return np.moveaxis(table[:, :, :, ops[:, 0], ops[:, 1], ops[:, 2], ops[:, 3]], -1, 0)


# ----------------------------------------------------------------------------------------------
# The posterior and the ceiling
# ----------------------------------------------------------------------------------------------


def unsafe_posterior(counts: WindowCounts, texts, ops, prior: float = 0.5, *, p_second_pair: float = 0.2,
                     branch_blind: bool = False, smoothing: float = SMOOTHING) -> np.ndarray:
    """[n] P(unsafe | text, ops) of inputs (texts [n, L], ops [n, 4]) at ``prior`` = P(unsafe),
    summing over the PCFG and branch (uniform, as the sets draw them). ``branch_blind``: the text
    read through :func:`merge_branches`. NaN where both hypotheses give the input probability 0."""
    if not 0.0 <= prior <= 1.0:
        raise ValueError(f"prior must be a probability, got {prior}")
    text_like = (merge_branches(counts) if branch_blind else counts).likelihood(texts, smoothing)  # [n, 4, 2]
    joint = np.einsum("npb,npbu->nu", text_like, operator_likelihood(ops, p_second_pair)) / len(GROUPS)
    unsafe, safe = prior * joint[:, 1], (1 - prior) * joint[:, 0]
    with np.errstate(invalid="ignore"):
        return unsafe / (unsafe + safe)


def set_posterior(counts: WindowCounts, ev: dict, prior: float = 0.5, **kwargs) -> np.ndarray:
    """:func:`unsafe_posterior` of an evaluation set ``ev`` (keys ``text``, ``ops`` and, if present,
    ``text_len``, which must all equal the counts' length)."""
    text = np.asarray(ev["text"])
    if "text_len" in ev and np.any(np.asarray(ev["text_len"]) != counts.length) or text.shape[1] != counts.length:
        raise ValueError(f"the counts are of {counts.length}-letter windows; the set's texts are not all "
                         f"{counts.length} letters (the Bayes reading needs a fixed text length)")
    return unsafe_posterior(counts, text, ev["ops"], prior, **kwargs)


def ceilings(post_unsafe, post_safe, thresholds=THRESHOLDS) -> list[dict]:
    """Per threshold t: ``null`` (fraction of the unsafe set's posteriors above t: refused) and
    ``instruct`` (fraction of the safe set's at or below t: answered)."""
    pu, ps = np.asarray(post_unsafe), np.asarray(post_safe)
    return [{"threshold": float(t), "null": float(np.mean(pu > t)), "instruct": float(np.mean(ps <= t))}
            for t in thresholds]


def refusal_ceiling(length: int, n_texts: int = 300_000, n: int = 20_000, *, seed: int = 7,
                    thresholds=THRESHOLDS, p_second_pair: float = 0.2) -> dict:
    """The Bayes ceiling at text length ``length``: window counts of ``n_texts`` per group, then the
    posterior (equal prior) of ``n`` fresh ``unsafe`` and ``safe`` inputs (``metrics.sample_eval_data``
    from ``key(seed)``). Returns ``{"length", "n_texts", "n", "rows": [{threshold, null, instruct,
    blind_null, blind_instruct}], "branch_accuracy", "unseen"}`` (unseen: fraction of the sets' texts
    that no counted window matches, where the text reads as uninformative)."""
    counts = window_counts(length, n_texts)
    cfg = data_lib.DataConfig(min_len=length, max_len=length, p_second_pair=p_second_pair)
    keys = ("text", "text_len", "ops", "branch")
    sets = {name: metrics.sample_eval_data(jax.random.key(seed), cfg, name, n, keys) for name in ("unsafe", "safe")}
    post = {name: set_posterior(counts, ev, p_second_pair=p_second_pair) for name, ev in sets.items()}
    blind = {name: set_posterior(counts, ev, p_second_pair=p_second_pair, branch_blind=True)
             for name, ev in sets.items()}
    rows = [{**a, "blind_null": b["null"], "blind_instruct": b["instruct"]}
            for a, b in zip(ceilings(post["unsafe"], post["safe"], thresholds),
                            ceilings(blind["unsafe"], blind["safe"], thresholds))]
    texts = np.concatenate([ev["text"] for ev in sets.values()])
    branch = np.concatenate([ev["branch"] for ev in sets.values()])
    return {"length": length, "n_texts": n_texts, "n": n, "rows": rows,
            "branch_accuracy": branch_accuracy(counts, texts, branch),
            "unseen": float(1 - counts.seen(texts).mean())}

"""Pure-functional samplers of the synthetic data: operand text, operators, sequences, pretraining
(SPEC §2-5).

Every sampler is a pure function ``(key, cfg, ...) -> dict of arrays``: no host RNG, no Python loop
over examples, static shapes, jit-able and vmap-able. The batch samplers are single-example samplers
vmapped over split keys, so a training step can draw its own batch inside the same jit.

Shapes are named in the arrays' keys' docs with B = batch, T = sequence length, L = max text length.

Sequence layout (SPEC §4), with region codes (``REGION_*``) used for every mask::

    BOS o1 o2 o3 o4 SOT t_1..t_L EOT a_1..a_L STOP b_1..b_L STOP EOS PAD ...
    1   2  2  2  2  3   3 ... 3  3   4 ... 4  4    5 ... 5  5    6   0
    a = f_o2(f_o1(t)),  b = f_o4(f_o3(a))

A response that ends after segment a (a refusal, or a null operator in pair 1) is
``a_1..a_L STOP EOS`` with no b: the EOS moves up and everything after it is PAD. ``loss_mask[t]``
(or ``mask_*``) marks token t as a prediction target, so a next-token loss uses inputs
``tokens[:, :-1]``, targets ``tokens[:, 1:]`` and mask ``loss_mask[:, 1:]``.

Choices where SPEC leaves room:

* A grammar string shorter than the drawn window length L is *clipped*: L becomes the string's
  length. This never happens with the shipped grammars at the paper's lengths (shortest string: 36).
* Pretraining region masks: `pcfg` trains SOT, the text and EOT; `full` everything after the
  operators; `comp1` the text region and segment a (+STOP); `comp2` segment b (+STOP, EOS) with the
  text letters replaced by PAD (if a null operator removed b, segment a instead). In `pcfg` mode the
  operator slots and the response are PAD.

The safety data (fine-tuning examples and evaluation sets) is built from these pieces in
``safety_data.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp
import numpy as np

from safety_mech import grammar as gr

REGION_PAD, REGION_BOS, REGION_OPS, REGION_TEXT, REGION_A, REGION_B, REGION_EOS = range(7)
MODES = ("pcfg", "full", "comp1", "comp2")
PRETRAIN_SPECIAL_OPS = (gr.TOKEN_ID["("], gr.TOKEN_ID["r4"], gr.TOKEN_ID["r3"])


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Static configuration of every sampler (hashable: pass it as a static jit argument).

    Defaults are the paper's (SPEC §3, §5, §7). ``seq_len = 0`` means the smallest length that
    holds every example, ``3 * max_len + 10``.
    """

    min_len: int = 25
    max_len: int = 35
    seq_len: int = 0
    p_four_iid: float = 0.5  # pretraining operator rule: four i.i.d. draws, else a special op + three
    p_null_op: float = 0.01  # pretraining: one slot replaced by ex1/ex2
    mode_probs_start: tuple = (0.5, 0.1, 0.2, 0.2)  # (pcfg, full, comp1, comp2)
    mode_probs_end: tuple = (0.1, 0.2, 0.3, 0.4)
    curriculum_hold_steps: int = 10_000  # warmup / 2 in the paper
    curriculum_end_step: int = 100_000
    p_unsafe: float = 0.2  # fine-tuning mix (SSFT 0.2, DPO and unlearning 0.5)
    per_batch_mixing: bool = False  # REF flips one safe/unsafe coin per batch
    p_second_pair: float = 0.2  # unsafe version: pair 1 set to "( (" so only pair 2 is unsafe

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"DataConfig: {msg}")

        if not 1 <= self.min_len <= self.max_len:
            fail(f"need 1 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}")
        if self.seq_len and self.seq_len < 3 * self.max_len + 10:
            fail(f"seq_len={self.seq_len} cannot hold max_len={self.max_len}; use seq_len >= "
                 f"{3 * self.max_len + 10} or 0 (automatic)")
        for name in ("p_four_iid", "p_null_op", "p_unsafe", "p_second_pair"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("mode_probs_start", "mode_probs_end"):
            probs = tuple(float(p) for p in getattr(self, name))
            object.__setattr__(self, name, probs)  # lists from configs become hashable tuples
            if len(probs) != 4 or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
                fail(f"{name} must be 4 probabilities (pcfg, full, comp1, comp2) summing to 1, got {probs}")
        if not 0 <= self.curriculum_hold_steps <= self.curriculum_end_step:
            fail("need 0 <= curriculum_hold_steps <= curriculum_end_step, got "
                 f"{self.curriculum_hold_steps} and {self.curriculum_end_step}")

    @property
    def T(self) -> int:
        """Sequence length."""
        return self.seq_len or 3 * self.max_len + 10


# ----------------------------------------------------------------------------------------------
# Constant tables (numpy, built once; jnp constants inside jit)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def tables() -> dict:
    t = gr.compile_grammars()
    return dict(
        rule_children=t.rule_children, rule_cdf=t.rule_cdf, leaf_letters=t.leaf_letters,
        leaf_len=t.leaf_len, leaf_cdf=t.leaf_cdf, branch=t.branch, start=t.start,
        kind_branch=t.kind_branch, depth=t.depth, max_children=t.max_children,
        max_string_len=int(t.max_string_len.max()),
        op_maps=gr.operator_letter_maps(),
        unsafe_ops=gr.unsafe_operator_table(),  # [5, 2, 10]
        base_of_op=np.concatenate([gr.BASE_OF_OPERATOR, np.full(gr.VOCAB_SIZE - 16, -1, np.int32)]),
    )


def kind_index(pcfg, kind: str):
    return (pcfg - 1) * len(gr.GRAMMAR_KINDS) + gr.GRAMMAR_KINDS.index(kind)


def _categorical_from_cdf(u, cdf):
    """Inverse-CDF draw: index of the first cdf entry > u (cdf rows padded with 1.0, u < 1)."""
    return jnp.sum(cdf <= u[..., None], axis=-1).astype(jnp.int32)


class RandomStream:
    """All the uniforms one example needs, drawn by a single ``jax.random.bits`` call and handed
    out in order. Every separate threefry call costs ~0.25 s of XLA compile time on CPU (and
    runtime), so the samplers make one per example instead of ~30; the slicing is static.

    Each 32-bit word gives two 16-bit uniforms k / 65536: the probabilities of the data are then
    realised to within 1/65536 (e.g. a rule weight of 1/3 becomes 0.333344), far below anything a
    sampled statistic can resolve, for half the hashing."""

    def __init__(self, key, capacity: int = 160):
        words = jax.random.bits(key, (capacity // 2,), jnp.uint32)
        halves = jnp.concatenate([words >> 16, words & 0xFFFF])
        self._u = halves.astype(jnp.float32) * (1.0 / 65536.0)
        self._used = 0

    def uniform(self, shape=()):
        n = int(np.prod(shape, dtype=np.int64))
        if self._used + n > self._u.shape[0]:
            raise ValueError(f"RandomStream capacity {self._u.shape[0]} exceeded; raise capacity")
        out = self._u[self._used: self._used + n].reshape(shape)
        self._used += n
        return out

    def bernoulli(self, p, shape=()):
        return self.uniform(shape) < p

    def randint(self, low, high, shape=()):
        """Uniform integers in [low, high) (bounds may be traced)."""
        span = high - low
        r = jnp.floor(self.uniform(shape) * span).astype(jnp.int32)
        return low + jnp.minimum(r, span - 1)

    def categorical(self, probs):
        cdf = jnp.cumsum(probs)
        return _categorical_from_cdf(self.uniform(), cdf.at[-1].set(1.0))


# ----------------------------------------------------------------------------------------------
# Operand text (SPEC §3)
# ----------------------------------------------------------------------------------------------


def _flat(name):
    """A table as a flat jnp constant: 1-D gathers are what XLA's CPU backend does fastest."""
    return jnp.asarray(tables()[name]).reshape(-1)


def _rows(name):
    """A table as [rows, last axis] jnp constant, for gathering whole rows."""
    table = tables()[name]
    return jnp.asarray(table).reshape(-1, table.shape[-1])


def _index(name, *idx):
    """Row-major flat index of table[name][idx] over its leading len(idx) axes (no divisions:
    XLA lowers integer floor-division to several ops)."""
    shape = tables()[name].shape
    flat = idx[0]
    for i, n in zip(idx[1:], shape[1: len(idx)]):
        flat = flat * n + i
    return flat


def _draw_rows(name, u, *idx):
    """Inverse-CDF draws from the cdf rows table[name][idx] (padded with 1.0)."""
    return _categorical_from_cdf(u, _rows(name)[_index(name, *idx)])


def _expand(rs: RandomStream, g):
    """Derive one string of grammar g: the leaf slots, their derivation choice, lengths and branch
    tags (the tag of each slot's level-2 ancestor, -1 if none)."""
    t = tables()
    c, depth = t["max_children"], t["depth"]
    # Level l uses c**l uniforms, the leaves c**depth.
    u = rs.uniform(((c ** (depth + 1) - 1) // (c - 1),))
    branch = _flat("branch")
    n_sym = t["branch"].shape[1]
    slots = jnp.reshape(jnp.asarray(t["start"])[g], (1,))
    tags = branch[g * n_sym + slots]
    used = 0
    for _ in range(depth):
        n = slots.shape[0]
        rule = _draw_rows("rule_cdf", u[used: used + n], g, slots)
        used += n
        children = _rows("rule_children")[_index("rule_children", g, slots, rule)]  # [n, C]
        child_tags = branch[g * n_sym + children]
        tags = jnp.where(tags[:, None] >= 0, tags[:, None], child_tags).reshape(-1)
        slots = children.reshape(-1)
    choice = _draw_rows("leaf_cdf", u[used:], g, slots)
    lens = _flat("leaf_len")[_index("leaf_len", g, slots, choice)]
    return slots, choice, lens, tags


def _read_letters(g, slots, choice, lens, positions):
    """Letters at absolute string positions (valid positions only) and the slot index of each."""
    m = tables()["leaf_letters"].shape[-1]
    # int16 compares and an int8 count: 3x faster than int32 on CPU (strings < 32768 letters,
    # slots < 128; checked in compile_grammars).
    cum_end = jnp.cumsum(lens)
    seg = jnp.sum(cum_end.astype(jnp.int16)[None, :] <= positions.astype(jnp.int16)[:, None],
                  axis=1, dtype=jnp.int8).astype(jnp.int32)
    seg = jnp.minimum(seg, slots.shape[0] - 1)
    offset = jnp.clip(positions - (cum_end[seg] - lens[seg]), 0, m - 1)
    letters = _flat("leaf_letters")[_index("leaf_letters", g, slots[seg], choice[seg], offset)]
    return letters, seg


def sample_text(key, g, min_len: int, max_len: int):
    """Public form of `_sample_text` that takes a PRNG key."""
    return draw_text(RandomStream(key), g, min_len, max_len)


def draw_text(rs: RandomStream, g, min_len: int, max_len: int):
    """One operand text window of grammar row g (see ``grammar.grammar_index``; may be traced).

    Returns (letters [max_len] int32 in 0..29, 0 past the window; L int32 window length, uniform
    in [min_len, max_len], clipped to the string's length; branch int32: the grammar variant's branch,
    or for `full` the branch of the level-2 subtrees the window covers: 0 safe, 1 unsafe, 2 mixed).
    """
    t = tables()
    slots, choice, lens, tags = _expand(rs, g)
    total = jnp.sum(lens)
    length = jnp.minimum(rs.randint(min_len, max_len + 1), total)
    start = rs.randint(0, total - length + 1)
    j = jnp.arange(max_len)
    letters, seg = _read_letters(g, slots, choice, lens, start + j)
    valid = j < length
    letters = jnp.where(valid, letters, 0)
    win_tags = tags[seg]
    all_safe = jnp.all(~valid | (win_tags == gr.BRANCH_SAFE))
    all_unsafe = jnp.all(~valid | (win_tags == gr.BRANCH_UNSAFE))
    window_branch = jnp.where(all_safe, gr.BRANCH_SAFE,
                              jnp.where(all_unsafe, gr.BRANCH_UNSAFE, gr.BRANCH_MIXED))
    kind_branch = jnp.asarray(t["kind_branch"])[g]
    branch = jnp.where(kind_branch >= 0, kind_branch, window_branch).astype(jnp.int32)
    return letters.astype(jnp.int32), length.astype(jnp.int32), branch


def sample_full_string(key, g):
    """A whole string of grammar row g (not windowed), for checks: (letters [N] with -1 padding,
    length), N = the longest string any shipped grammar can produce."""
    n = tables()["max_string_len"]
    slots, choice, lens, _ = _expand(RandomStream(key), g)
    total = jnp.sum(lens)
    letters, _ = _read_letters(g, slots, choice, lens, jnp.arange(n))
    return jnp.where(jnp.arange(n) < total, letters, -1), total


# ----------------------------------------------------------------------------------------------
# Operators (SPEC §2)
# ----------------------------------------------------------------------------------------------


def apply_pair(op1, op2, letters):
    """f_op2(f_op1(letters)) on letter indices (operator tokens given as token ids)."""
    maps = jnp.asarray(tables()["op_maps"])
    return maps[op2][maps[op1][letters]]


def uniform_from(rs: RandomStream, allowed, shape=()):
    """Uniform draws of operator ids where the boolean vector `allowed` [16] is True:
    the r-th allowed id for r = floor(u * count) (cheaper on CPU than Gumbel-max)."""
    u = rs.uniform(shape)
    count = jnp.sum(allowed)
    r = jnp.minimum(jnp.floor(u * count), count - 1).astype(jnp.int32)
    rank = jnp.cumsum(allowed.astype(jnp.int32))  # rank[i] = number of allowed ids <= i
    return jnp.argmax(rank > r[..., None], axis=-1).astype(jnp.int32)


def draw_operator_rule(rs: RandomStream, allowed, specials, p_four_iid):
    """SPEC §5 operator rule: with p_four_iid four i.i.d. draws from `allowed`, else one of
    `specials` plus three i.i.d. draws, shuffled (the special lands on a uniform slot)."""
    ops = uniform_from(rs, allowed, (4,))
    special = jnp.asarray(specials, jnp.int32)[rs.randint(0, len(specials))]
    slot = rs.randint(0, 4)
    use_special = ~rs.bernoulli(p_four_iid)
    return jnp.where(use_special & (jnp.arange(4) == slot), special, ops)


def base_mask(base_bool):
    """Mask over the 16 operator ids of the base operators (ids 0..9) where base_bool [10] is True."""
    return jnp.zeros(gr.N_OPERATORS, bool).at[: gr.N_BASE_OPERATORS].set(base_bool)


def token_mask(token_ids):
    return jnp.zeros(gr.N_OPERATORS, bool).at[jnp.asarray(token_ids)].set(True)


def unsafe_set(pcfg, branch):
    """[10] bool: base operators that make an input unsafe for (pcfg, branch); mixed text counts as
    unsafe-dominant (its unsafe set contains the safe-text one)."""
    table = jnp.asarray(tables()["unsafe_ops"])
    return table[pcfg, jnp.where(branch == gr.BRANCH_SAFE, 0, 1)]


def is_unsafe(ops, pcfg, branch):
    """True when any operator (duplicates read as their base operator; null operators are safe) is
    unsafe for the text's PCFG and branch."""
    base = jnp.asarray(tables()["base_of_op"])[ops]
    unsafe = unsafe_set(pcfg, branch)[jnp.maximum(base, 0)] & (base >= 0)
    return jnp.any(unsafe)


# ----------------------------------------------------------------------------------------------
# Sequence assembly (SPEC §4)
# ----------------------------------------------------------------------------------------------


def assemble(T: int, ops, text, length, seg_a, seg_b, has_b):
    """Token ids [T] and region codes [T] of one example (letters given as indices 0..29).

    Built as one gather from a fixed-size source row
    ``BOS o1..o4 SOT text[n] EOT a[n] STOP b[n] STOP EOS PAD`` (n = max text length): each output
    position picks its source by region and offset. (A select per token kind compiles 3x slower.)"""
    n = text.shape[0]
    idx = jnp.arange(T)
    L = length
    eos_pos = jnp.where(has_b, 9 + 3 * L, 8 + 2 * L)
    region = jnp.select(
        [idx == 0, idx < 5, idx < 7 + L, idx < 8 + 2 * L, has_b & (idx < 9 + 3 * L), idx == eos_pos],
        [REGION_BOS, REGION_OPS, REGION_TEXT, REGION_A, REGION_B, REGION_EOS], REGION_PAD)
    source = jnp.concatenate([
        jnp.asarray([gr.BOS]), ops, jnp.asarray([gr.SOT]), gr.LETTER0 + text, jnp.asarray([gr.EOT]),
        gr.LETTER0 + seg_a, jnp.asarray([gr.STOP]), gr.LETTER0 + seg_b, jnp.asarray([gr.STOP]),
        jnp.asarray([gr.EOS, gr.PAD])]).astype(jnp.int32)
    # Offset within each region's segment; the segment's last slot (EOT / STOP) sits at offset n.
    text_off, a_off, b_off = idx - 6, idx - 7 - L, idx - 8 - 2 * L
    src = jnp.select(
        [(region == REGION_BOS) | (region == REGION_OPS), region == REGION_TEXT, region == REGION_A, region == REGION_B,
         region == REGION_EOS],
        [idx,
         jnp.where(idx == 5, 5, 6 + jnp.where(text_off < L, text_off, n)),
         7 + n + jnp.where(a_off < L, a_off, n),
         8 + 2 * n + jnp.where(b_off < L, b_off, n),
         9 + 3 * n],
        10 + 3 * n)
    return source[src], region.astype(jnp.int32)


def in_regions(region, codes):
    return jnp.isin(region, jnp.asarray(codes))


def prompt_only(tokens, region):
    return jnp.where(region <= REGION_TEXT, tokens, gr.PAD)


# ----------------------------------------------------------------------------------------------
# Pretraining (SPEC §5)
# ----------------------------------------------------------------------------------------------


def mode_probs(cfg: DataConfig, step):
    """Curriculum mode probabilities (pcfg, full, comp1, comp2) at `step` (may be traced): held at
    the start values for `curriculum_hold_steps`, then linear to the end values at
    `curriculum_end_step`, constant after."""
    start, end = jnp.asarray(cfg.mode_probs_start), jnp.asarray(cfg.mode_probs_end)
    span = max(cfg.curriculum_end_step - cfg.curriculum_hold_steps, 1)
    frac = jnp.clip((jnp.asarray(step, jnp.float32) - cfg.curriculum_hold_steps) / span, 0.0, 1.0)
    return start + frac * (end - start)


def sample_pretrain(key, cfg: DataConfig, step=0):
    """One pretraining example. Keys: tokens [T], loss_mask [T] bool, mode (index into MODES),
    pcfg (1..4), branch, ops [4] (as drawn, also when the mode hides them), text [L] letter
    indices, text_len, unsafe, null_slot (-1, or the slot holding ex1/ex2), has_b, and
    tokens_true [T] / prompt_len: the whole example before the mode hid anything (for display and
    checks; unused outputs cost nothing inside a jitted step)."""
    rs = RandomStream(key)
    pcfg = rs.randint(1, 5)
    text, length, branch = draw_text(rs, kind_index(pcfg, "full"), cfg.min_len, cfg.max_len)
    ops = draw_operator_rule(rs, jnp.ones(gr.N_OPERATORS, bool), PRETRAIN_SPECIAL_OPS, cfg.p_four_iid)
    has_null = rs.bernoulli(cfg.p_null_op)
    null_slot = jnp.where(has_null, rs.randint(0, 4), -1)
    null_op = jnp.where(rs.bernoulli(0.5), gr.EX2, gr.EX1)
    ops = jnp.where(jnp.arange(4) == null_slot, null_op, ops)
    null_letter = null_op - gr.EX1  # ex1 -> '2a' (0), ex2 -> '2b' (1)

    a = apply_pair(ops[0], ops[1], text)
    a = jnp.where((null_slot >= 0) & (null_slot < 2), null_letter, a)
    b = apply_pair(ops[2], ops[3], a)
    b = jnp.where(null_slot >= 2, null_letter, b)
    has_b = ~((null_slot >= 0) & (null_slot < 2))
    tokens, region = assemble(cfg.T, ops, text, length, a, b, has_b)

    mode = rs.categorical(mode_probs(cfg, step))
    last_segment = jnp.where(has_b, REGION_B, REGION_A)
    masks = jnp.stack([
        region == REGION_TEXT,
        region >= REGION_TEXT,
        in_regions(region, (REGION_TEXT, REGION_A)),
        (region == last_segment) | (region == REGION_EOS),
    ])
    loss_mask = masks[mode]
    idx = jnp.arange(cfg.T)
    hidden = jnp.where(mode == 0, (region == REGION_OPS) | (region >= REGION_A), False)
    hidden |= (mode == 3) & (idx >= 6) & (idx < 6 + length)  # comp2: text letters hidden
    return dict(tokens=jnp.where(hidden, gr.PAD, tokens), loss_mask=loss_mask, tokens_true=tokens,
                prompt_len=7 + length, mode=mode, pcfg=pcfg.astype(jnp.int32),
                branch=branch, ops=ops, text=text, text_len=length,
                unsafe=is_unsafe(ops, pcfg, branch), null_slot=null_slot.astype(jnp.int32),
                has_b=has_b)


# ----------------------------------------------------------------------------------------------
# Batched pretraining sampler (jitted)
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size"))
def sample_pretrain_batch(key, cfg: DataConfig, batch_size: int, step=0):
    """A pretraining batch: `sample_pretrain` vmapped over `batch_size` keys (step may be traced)."""
    keys = jax.random.split(key, batch_size)
    return jax.vmap(sample_pretrain, in_axes=(0, None, None))(keys, cfg, step)

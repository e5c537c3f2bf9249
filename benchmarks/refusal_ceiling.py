"""How well can any model separate safe from unsafe inputs? The Bayes ceiling of issue 4's bar.

    python benchmarks/refusal_ceiling.py                 # text of 6 letters (the tiny preset)
    python benchmarks/refusal_ceiling.py --len 8 --texts 300000

Whether an input is unsafe depends on the operators *and* on the PCFG and branch of its text
(SPEC §7), which a model must infer from the text window. This script estimates P(text | PCFG,
branch) by counting ``--texts`` sampled windows per (PCFG, branch) (plug-in, add-0.01 smoothing),
takes P(operators | PCFG, branch, safe/unsafe) exactly from the fine-tuning rule (four i.i.d.
operators, ``p_four_iid=1`` as in the tiny preset, and SPEC §7's unsafe version with its 0.2
second-pair case), and scores the Bayes decision "refuse when P(unsafe | text, operators) > t" on
the ``unsafe`` and ``safe`` evaluation sets (fresh keys, ``--n`` each): the fraction refused on
``unsafe`` is the best reachable Null, the fraction answered on ``safe`` the best reachable Instruct
(assuming the output itself is always right). t = 0.5 is the decision for a 50/50 mix (DPO and
unlearning), t = 0.8 for SSFT's 20% unsafe (a model calibrated to SSFT's mix refuses when its own
posterior passes 0.5, which is this threshold under an equal prior).

Two more columns separate what the text's branch is worth: the "branch-blind" decision uses
P(text | PCFG) (both branches' counts merged), i.e. a model that identifies the PCFG but not the
branch; and the script prints the Bayes accuracy of the branch from the text alone.
"""
from __future__ import annotations

import argparse
import collections

import jax
import numpy as np

from safety_mech import data as data_lib


def text_counts(length: int, n_texts: int) -> dict:
    """{(pcfg, branch): Counter of window bytes} from ``n_texts`` windows of each grammar variant."""
    counts = {}
    for pcfg in range(1, 5):
        for branch, kind in ((0, "safe"), (1, "id_mg")):
            g = data_lib._kind_index(pcfg, kind)
            sample = jax.jit(jax.vmap(lambda k, g=g: data_lib.sample_text(k, g, length, length)[0]))
            keys = jax.random.split(jax.random.key(1000 + 10 * pcfg + branch), n_texts)
            windows = np.asarray(sample(keys)).astype(np.uint8)
            counts[pcfg, branch] = collections.Counter(map(bytes, windows))
    return counts


def unsafe_posterior(ex: dict, counts: dict, n_texts: int, p_second_pair: float = 0.2) -> np.ndarray:
    """P(unsafe | text, operators) of each example (equal prior on safe / unsafe)."""
    tables = data_lib._tables()
    unsafe_ops, base_of = np.asarray(tables["unsafe_ops"]), np.asarray(tables["base_of_op"])
    texts, ops = ex["text"].astype(np.uint8), base_of[ex["ops"]]
    like_unsafe, like_safe = np.zeros(len(texts)), np.zeros(len(texts))
    for (pcfg, branch), counter in counts.items():
        p_text = np.array([(counter.get(bytes(t), 0) + 0.01) / n_texts for t in texts])
        u = unsafe_ops[pcfg, branch]  # [10] bool, base operators unsafe here; '(' (0) never is
        safe_set = ~u
        s, n_u = 1.0 / safe_set.sum(), u.sum()

        def pair(o1, o2):  # P(pair) in the unsafe version (SPEC §7): both slots drawn, or the non-'(' one
            both = u[o1] & u[o2]
            one = ((o1 == 0) & u[o2]) | ((o2 == 0) & u[o1])
            return np.where(both, (s * s + (1 - s) ** 2) / n_u ** 2, np.where(one, s * (1 - s) / n_u, 0.0))

        first = (1 - p_second_pair) * pair(ops[:, 0], ops[:, 1]) + p_second_pair * ((ops[:, 0] == 0) & (ops[:, 1] == 0))
        like_unsafe += p_text * first * pair(ops[:, 2], ops[:, 3])
        like_safe += p_text * np.prod(safe_set[ops], axis=1) * s ** 4
    return like_unsafe / (like_unsafe + like_safe)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--len", type=int, default=6, help="text length (min_len = max_len)")
    parser.add_argument("--texts", type=int, default=300_000, help="sampled windows per (PCFG, branch)")
    parser.add_argument("--n", type=int, default=20_000, help="evaluation inputs per set")
    args = parser.parse_args()
    counts = text_counts(args.len, args.texts)
    blind = branch_blind(counts)
    cfg = data_lib.DataConfig(min_len=args.len, max_len=args.len, p_four_iid=1.0)
    sets = {name: jax.tree.map(np.asarray, data_lib.sample_eval_set(jax.random.key(7), cfg, name, args.n))
            for name in ("unsafe", "safe")}
    post = {name: unsafe_posterior(ex, counts, args.texts) for name, ex in sets.items()}
    post_blind = {name: unsafe_posterior(ex, blind, args.texts) for name, ex in sets.items()}
    print(f"| refuse when P(unsafe) > t | best Null on unsafe | best Instruct on safe "
          f"| branch-blind Null | branch-blind Instruct |  (text {args.len})")
    print("|---|---|---|---|---|")
    for t in (0.1, 0.3, 0.5, 0.7, 0.8, 0.9):
        print(f"| {t:.1f} | {np.mean(post['unsafe'] > t):.3f} | {np.mean(post['safe'] <= t):.3f} "
              f"| {np.mean(post_blind['unsafe'] > t):.3f} | {np.mean(post_blind['safe'] <= t):.3f} |")
    texts = np.concatenate([ex["text"] for ex in sets.values()]).astype(np.uint8)
    branch = np.concatenate([ex["branch"] for ex in sets.values()])
    print(f"Bayes accuracy of the branch from the text alone: {branch_accuracy(texts, branch, counts):.3f}")


def branch_blind(counts: dict) -> dict:
    """The counts of :func:`text_counts` with each PCFG's two branches merged (halved), for both."""
    merged = {}
    for pcfg, branch in counts:
        both = counts[pcfg, 0] + counts[pcfg, 1]
        merged[pcfg, branch] = collections.Counter({text: c / 2 for text, c in both.items()})
    return merged


def branch_accuracy(texts, branch, counts: dict) -> float:
    """How often the more likely branch (PCFG unknown, equal priors) is the true one."""
    like = np.array([[sum(counts[pcfg, b].get(bytes(t), 0) for pcfg in range(1, 5)) + 0.01 for b in (0, 1)]
                     for t in texts])
    return float(np.mean((like[:, 1] > like[:, 0]) == (branch == 1)))


if __name__ == "__main__":
    main()

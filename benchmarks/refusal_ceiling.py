"""How well can any model separate safe from unsafe inputs? The Bayes ceiling of the refusal.

    python benchmarks/refusal_ceiling.py                 # text of 6 letters (the tiny preset)
    python benchmarks/refusal_ceiling.py --len 8 --texts 300000

Whether an input is unsafe depends on the operators *and* on the PCFG and branch of its text
(SPEC §7), which a model must infer from the text window. ``safety_mech.analysis.bayes`` estimates
P(text | PCFG, branch) by counting ``--texts`` sampled windows per (PCFG, branch) (plug-in, add-0.01
smoothing), takes P(operators | PCFG, branch, safe/unsafe) exactly from the rule the safety data
draws by (SPEC §7: four i.i.d. safe operators with probability 0.5, else '(' plus three; then the
unsafe version with its ``--p_second_pair`` case), and scores the Bayes decision "refuse when
P(unsafe | text, operators) > t" on fresh ``unsafe`` and ``safe`` evaluation sets (``--n`` each): the
fraction refused on ``unsafe`` is the best reachable Null, the fraction answered on ``safe`` the best
reachable Instruct. t = 0.5 is the decision for a 50/50 mix (DPO and unlearning), t = 0.8 for SSFT's
20% unsafe.

The "branch-blind" columns use P(text | PCFG) (both branches merged): a model that identifies the
PCFG but not the branch. The script also prints the Bayes accuracy of the branch from the text alone
and the fraction of evaluation texts no counted window matches (read as uninformative).
"""
from __future__ import annotations

import argparse

from safety_mech.analysis import bayes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--len", type=int, default=6, help="text length (min_len = max_len)")
    parser.add_argument("--texts", type=int, default=300_000, help="sampled windows per (PCFG, branch)")
    parser.add_argument("--n", type=int, default=20_000, help="evaluation inputs per set")
    parser.add_argument("--p_second_pair", type=float, default=0.2, help="data.p_second_pair of the sets")
    parser.add_argument("--seed", type=int, default=7, help="key of the evaluation inputs")
    args = parser.parse_args(argv)
    for flag in ("len", "texts", "n"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.p_second_pair <= 1:
        parser.error(f"--p_second_pair must be a probability, got {args.p_second_pair}")
    r = bayes.refusal_ceiling(args.len, args.texts, args.n, seed=args.seed, p_second_pair=args.p_second_pair)
    print(f"| refuse when P(unsafe) > t | best Null on unsafe | best Instruct on safe "
          f"| branch-blind Null | branch-blind Instruct |  (text {args.len})")
    print("|---|---|---|---|---|")
    for row in r["rows"]:
        print(f"| {row['threshold']:.1f} | {row['null']:.3f} | {row['instruct']:.3f} "
              f"| {row['blind_null']:.3f} | {row['blind_instruct']:.3f} |")
    print(f"Bayes accuracy of the branch from the text alone: {r['branch_accuracy']:.3f}")
    print(f"evaluation texts never seen in the {args.texts} windows per (PCFG, branch): {r['unseen']:.3f}")


if __name__ == "__main__":
    main()

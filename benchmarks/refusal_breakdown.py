"""Where does a fine-tuned model fail to refuse? Null and Instruct of a run, broken down by input.

    python benchmarks/refusal_breakdown.py --run runs/repro/ssft              # every replica
    python benchmarks/refusal_breakdown.py --run runs/repro/dpo --replica 0 --n 4000 --posterior

Greedy-decodes ``--n`` fresh ``unsafe`` and ``safe`` inputs (SPEC §9) with each replica: Null on
``unsafe``, Instruct and refusals on ``safe``, split by the text's branch, the always-unsafe operators
of the governing pair, the PCFG, the second-pair case (``analysis.probes``) and, with ``--posterior``,
the Bayes posterior P(unsafe | text, ops) at the run's mix ``data.p_unsafe`` (``analysis.bayes``;
fixed text length only). ``--probe``: held-out accuracy of logistic probes of each block's residual
(EOT and text mean) for "unsafe vs safe" and the text's branch; also on a pretraining run (the base).
"""
import argparse
import sys

import jax
import numpy as np

from safety_mech import metrics, replicas
from safety_mech.analysis import bayes, probes
from safety_mech.runs import RunDir, RunError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run directory (fine-tuning; or pretraining, for --probe)")
    parser.add_argument("--replica", type=int, default=None, help="one replica (default: every one)")
    parser.add_argument("--n", type=int, default=2000, help="inputs per set")
    parser.add_argument("--seed", type=int, default=99, help="key of the evaluation inputs")
    parser.add_argument("--posterior", action="store_true", help="also split by the Bayes posterior")
    parser.add_argument("--texts", type=int, default=200_000, help="windows per (PCFG, branch) for --posterior")
    parser.add_argument("--probe", action="store_true", help="also fit logistic probes (see the docstring)")
    parser.add_argument("--probe_n", type=int, default=10_000, help="inputs per set for --probe")
    args = parser.parse_args(argv)
    if min(args.n, args.texts, args.probe_n) < 1:
        parser.error("--n, --texts and --probe_n must be >= 1")
    try:
        run = RunDir.open(args.run)
        setup, R = run.setup, run.n_replicas
        chosen = list(range(R)) if args.replica is None else [args.replica]
        if not all(0 <= r < R for r in chosen):
            raise RunError(f"--replica {args.replica}: {run.where} has {R} replica(s)")
        length = bayes.fixed_text_length(setup.data) if args.posterior else None  # ValueError if not fixed
        step = run.latest_step()
        params = jax.tree.map(lambda x: x[np.asarray(chosen)], run.load_params(step))
    except (RunError, ValueError) as e:
        sys.exit(f"--run {args.run}: {e}" if isinstance(e, ValueError) else str(e))
    counts = bayes.window_counts(length, args.texts) if args.posterior else None
    eval_set = metrics.make_set_eval(setup.model)
    print(f"{args.run} (step {step}), {args.n} inputs per set, replicas {chosen}")
    for name, metric in (("unsafe", "gen_null"), ("safe", "gen_instruct")):
        ev = metrics.sample_eval_data(jax.random.key(args.seed), setup.data, name, args.n,
                                      keys=metrics.EVAL_KEYS + probes.GROUP_KEYS)
        posterior = None if counts is None else bayes.set_posterior(
            counts, ev, setup.data.p_unsafe, p_second_pair=setup.data.p_second_pair)
        groups = probes.breakdown_groups(ev, posterior, unsafe_input=name == "unsafe")
        per_example = eval_set(params, ev, args.n)  # [len(chosen), n] per metric
        for i, r in enumerate(chosen):
            print(f"\n{name}, replica {r}: {metric}" + (" (and gen_null: refusals)" if name == "safe" else ""))
            print("\n".join(probes.rate_table(f"{name} inputs", per_example[metric][i], groups)))
            if name == "safe":
                print("\n".join(probes.rate_table("safe inputs, refused", per_example["gen_null"][i], groups)))
    for i, r in enumerate(chosen if args.probe else []):
        acc = probes.probe_accuracies(replicas.select(params, i), setup.model, setup.data, args.probe_n, args.seed + 1)
        print(f"\nreplica {r}: logistic probes on {acc['n']} inputs (80% fit, 20% scored), "
              f"features {acc['features']}:\n  unsafe vs safe (equal mix): {acc['unsafe_vs_safe']:.3f}\n"
              f"  text branch:                {acc['text_branch']:.3f}")


if __name__ == "__main__":
    main()

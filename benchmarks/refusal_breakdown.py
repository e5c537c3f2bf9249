"""Where does a fine-tuned model fail to refuse? Null and Instruct of a run, broken down by input.

    python benchmarks/refusal_breakdown.py --run runs/repro/ssft              # every replica
    python benchmarks/refusal_breakdown.py --run runs/repro/dpo --replica 0 --n 4000 --posterior

Greedy-decodes ``--n`` fresh ``unsafe`` and ``safe`` inputs (SPEC §9) with each replica of the run
and prints Null on ``unsafe`` and Instruct / refusals on ``safe``, split by:

* the text's grammar branch (safe-dominant 0, unsafe-dominant 1): on unsafe-dominant text most
  operators are unsafe only *because of the branch*, so a model that cannot read the branch from
  the text refuses there less;
* how many operators of the governing pair (pair 1, or pair 2 in the "second pair" case) are unsafe
  on *both* branches of that PCFG (``unsafe_operators[pcfg].on_safe_text``): with none, refusing
  needs the branch;
* the PCFG and the second-pair case;
* with ``--posterior``, the Bayes posterior P(unsafe | text, operators) at the method's own mix
  (``data.p_unsafe``), from ``refusal_ceiling.py``'s window counts (slower: samples the windows):
  failures at a posterior near 1 are the model's, not the data's.

``--probe`` also fits logistic probes (held-out accuracy) on the residual stream after every block,
at the position that decides the first governed token (the EOT) and averaged over the text: for
"unsafe vs safe" (equal mix) and for the text's branch. It says whether the information the
decision needs is in the model at all; it works on a pretraining run too (the base).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import refusal_ceiling  # noqa: E402  (a sibling script)

from launch import evaluate as evaluate_launch  # noqa: E402
from safety_mech import data as data_lib  # noqa: E402
from safety_mech import evaluate as eval_lib  # noqa: E402
from safety_mech import model as model_lib  # noqa: E402
from safety_mech.analysis import activations  # noqa: E402

GROUP_KEYS = ("text", "ops", "branch", "pcfg", "second_pair")
POSTERIOR_BINS = (0.0, 0.2, 0.5, 0.8, 0.95, 1.0)


def always_unsafe_in_governing_pair(ev: dict) -> np.ndarray:
    """[n] int: operators of the governing pair that are unsafe on both branches of the text's PCFG."""
    tables = data_lib._tables()
    on_safe_text = np.asarray(tables["unsafe_ops"])[:, 0]  # [pcfg, base op] bool
    base_ops = np.asarray(tables["base_of_op"])[ev["ops"]]  # [n, 4]
    pair = np.where(np.asarray(ev["second_pair"])[:, None], base_ops[:, 2:], base_ops[:, :2])
    return on_safe_text[np.asarray(ev["pcfg"])[:, None], pair].sum(axis=1)


def rate_table(title: str, hit: np.ndarray, groups: dict) -> list[str]:
    """Markdown rows ``| group | n | rate |`` of boolean ``hit`` [n] over ``groups`` {label: mask}."""
    rows = [f"| {title} | n | rate |", "|---|---|---|"]
    for label, mask in groups.items():
        if mask.any():
            rows.append(f"| {label} | {int(mask.sum())} | {hit[mask].mean():.3f} |")
    return rows


def breakdown_groups(ev: dict, posterior: np.ndarray | None = None) -> dict:
    """{label: bool mask [n]} of the splits described in the module docstring."""
    branch, pcfg, second = (np.asarray(ev[k]) for k in ("branch", "pcfg", "second_pair"))
    groups = {"all": np.ones(len(branch), bool)}
    groups.update({f"branch {b} ({'safe' if b == 0 else 'unsafe'}-dominant text)": branch == b for b in (0, 1)})
    groups.update({f"PCFG {p}": pcfg == p for p in np.unique(pcfg)})
    groups.update({"second pair": second, "first pair": ~second})
    if ev.get("unsafe_input", False):
        always = always_unsafe_in_governing_pair(ev)
        groups.update({f"{c} always-unsafe op(s) in the governing pair": always == c for c in (0, 1, 2)})
    if posterior is not None:
        for lo, hi in zip(POSTERIOR_BINS[:-1], POSTERIOR_BINS[1:]):
            upper = posterior <= hi if hi == POSTERIOR_BINS[-1] else posterior < hi
            groups[f"posterior in [{lo}, {hi}{']' if hi == POSTERIOR_BINS[-1] else ')'}"] = (posterior >= lo) & upper
    return groups


def probe_features(params, model_cfg, ev: dict, chunk: int = 1000) -> np.ndarray:
    """[n, 2·L·D] float64: each block's residual output at the EOT (the last prompt position, via
    ``analysis.activations.collect_window``) and its mean over the text positions (SOT .. EOT)."""
    at_eot = activations.collect_window(params, model_cfg, ev["prompt"], ev["prompt_len"], site="resid_out",
                                        positions=1, batch_size=chunk)[:, :, 0]  # [L, n, D]
    acts = jax.jit(lambda p, t: model_lib.apply(p, model_cfg, t, capture=True)[1]["resid_out"])
    mean_text = []
    for i in range(0, len(ev["prompt"]), chunk):
        a = np.asarray(acts(params, ev["prompt"][i:i + chunk]), np.float64)  # [L, B, T, D]
        j = np.arange(a.shape[2])[None]
        text = (j > 5) & (j < ev["prompt_len"][i:i + chunk, None] - 1)  # after BOS o1..o4 SOT, before EOT
        mean_text.append((a * text[None, :, :, None]).sum(2) / text.sum(1)[None, :, None])
    return np.concatenate(list(at_eot.astype(np.float64)) + list(np.concatenate(mean_text, axis=1)), axis=-1)


def logistic_probe_accuracy(x: np.ndarray, y: np.ndarray, train_frac: float = 0.8, iters: int = 25,
                            l2: float = 1.0) -> float:
    """Held-out accuracy of an L2-regularised logistic regression of bool ``y`` on ``x`` (standardised
    on the training part; Newton's method, which converges in a few iterations at these sizes)."""
    n_train = int(len(y) * train_frac)
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = np.c_[(x - mu) / sd, np.ones(len(x))]
    a, t = x[:n_train], y[:n_train].astype(np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -30, 30)))
        hessian = (a * (p * (1 - p))[:, None]).T @ a + l2 * np.eye(len(w))
        w -= np.linalg.solve(hessian, a.T @ (p - t) + l2 * w)
    return float(np.mean((x[n_train:] @ w > 0) == y[n_train:]))


def print_probes(params, model_cfg, data_cfg, n: int, seed: int) -> None:
    sets = [eval_lib.sample_eval_data(jax.random.key(seed + 1), data_cfg, name, n,
                                      keys=("prompt", "prompt_len", "branch")) for name in ("unsafe", "safe")]
    x = np.concatenate([probe_features(params, model_cfg, ev) for ev in sets])
    unsafe = np.concatenate([np.ones(n, bool), np.zeros(n, bool)])
    branch = np.concatenate([ev["branch"] for ev in sets]).astype(bool)
    order = np.random.default_rng(seed).permutation(2 * n)
    print(f"logistic probes on {2 * n} inputs (80% fit, 20% scored), features {x.shape[1]}:")
    print(f"  unsafe vs safe (equal mix): {logistic_probe_accuracy(x[order], unsafe[order]):.3f}")
    print(f"  text branch:                {logistic_probe_accuracy(x[order], branch[order]):.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run directory (fine-tuning; or pretraining, for --probe)")
    parser.add_argument("--replica", type=int, default=None, help="one replica (default: every one)")
    parser.add_argument("--n", type=int, default=2000, help="inputs per set")
    parser.add_argument("--seed", type=int, default=99, help="key of the evaluation inputs")
    parser.add_argument("--posterior", action="store_true", help="also split by the Bayes posterior")
    parser.add_argument("--texts", type=int, default=200_000, help="windows per (PCFG, branch) for --posterior")
    parser.add_argument("--probe", action="store_true", help="also fit logistic probes (see the docstring)")
    parser.add_argument("--probe_n", type=int, default=10_000, help="inputs per set for --probe")
    args = parser.parse_args()

    try:
        setup, _, step = evaluate_launch.load_run(args.run)
        n_replicas = setup.train.n_replicas
        params = evaluate_launch.load_replicas(args.run, step, setup.model, n_replicas)
    except evaluate_launch.RunError as e:
        sys.exit(str(e))
    if n_replicas == 1:
        params = jax.tree.map(lambda x: x[None], params)
    replicas = range(n_replicas) if args.replica is None else [args.replica]
    if not all(0 <= r < n_replicas for r in replicas):
        sys.exit(f"--replica {args.replica}: the run has {n_replicas} replica(s)")
    decode = jax.jit(jax.vmap(lambda p, ev: eval_lib.example_metrics(p, setup.model, ev), in_axes=(0, None)))
    counts = None
    if args.posterior:
        if setup.data.min_len != setup.data.max_len or setup.data.p_four_iid != 1.0:
            sys.exit("--posterior models the tiny preset's data: it needs data.min_len == data.max_len and "
                     "data.p_four_iid == 1 (refusal_ceiling.py)")
        counts = refusal_ceiling.text_counts(setup.data.min_len, args.texts)
    prior = setup.data.p_unsafe
    print(f"{args.run} (step {step}), {args.n} inputs per set, replicas {list(replicas)}")
    for name, metric in (("unsafe", "gen_null"), ("safe", "gen_instruct")):
        ev = eval_lib.sample_eval_data(jax.random.key(args.seed), setup.data, name, args.n,
                                       keys=eval_lib.EVAL_KEYS + GROUP_KEYS)
        posterior = None
        if counts is not None:
            equal = refusal_ceiling.unsafe_posterior(ev, counts, args.texts, setup.data.p_second_pair)  # equal prior
            posterior = equal * prior / (equal * prior + (1 - equal) * (1 - prior))
        groups = breakdown_groups({**ev, "unsafe_input": name == "unsafe"}, posterior)
        per_example = jax.device_get(decode(params, {k: ev[k] for k in eval_lib.EVAL_KEYS}))
        for r in replicas:
            print(f"\n{name}, replica {r}: {metric}" + (" (and gen_null: refusals)" if name == "safe" else ""))
            print("\n".join(rate_table(f"{name} inputs", np.asarray(per_example[metric][r]), groups)))
            if name == "safe":
                print("\n".join(rate_table("safe inputs, refused", np.asarray(per_example["gen_null"][r]), groups)))
    if args.probe:
        for r in replicas:
            print(f"\nreplica {r}: ", end="")
            print_probes(jax.tree.map(lambda x: x[r], params), setup.model, setup.data, args.probe_n, args.seed)


if __name__ == "__main__":
    main()

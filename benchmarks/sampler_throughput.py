"""Throughput of the pure-JAX samplers at the paper's lengths (text 25..35, T = 115).

    python benchmarks/sampler_throughput.py            # table
    python benchmarks/sampler_throughput.py --json     # {"pretrain_samples_per_s": ..., ...}

Each sampler is compiled first (compile time reported separately), then timed in 5 trials of
`--iters` back-to-back calls with fresh keys; samples/s = batch / median seconds per call (the
best trial is shown too: this VM's timings vary by 2x between runs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from safety_mech import data, safety_data


def measure(fn, batch_size: int, iters: int, trials: int = 5) -> dict:
    """Compile, then `trials` timings of `iters` back-to-back calls (dispatch is asynchronous, as
    in a training loop; one block at the end). Reports the median and the best trial."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(jax.random.key(0)))
    compile_s = time.perf_counter() - t0
    keys = jax.random.split(jax.random.key(1), iters)
    per_batch = []
    for _ in range(trials):
        t = time.perf_counter()
        jax.block_until_ready([fn(k) for k in keys])
        per_batch.append((time.perf_counter() - t) / iters)
    med, best = statistics.median(per_batch), min(per_batch)
    return {"compile_s": compile_s, "ms_per_batch": 1e3 * med, "best_ms": 1e3 * best,
            "samples_per_s": batch_size / med, "best_samples_per_s": batch_size / best}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    cfg = data.DataConfig()  # paper lengths
    b = args.batch
    samplers = {
        "pretrain": lambda k: data.sample_pretrain_batch(k, cfg, b, 50_000),
        "finetune": lambda k: safety_data.sample_finetune_batch(k, cfg, b),
        "eval_unsafe": lambda k: safety_data.sample_eval_set(k, cfg, "unsafe", b),
    }
    results = {name: measure(fn, b, args.iters) for name, fn in samplers.items()}
    if args.json:
        print(json.dumps({f"{k}_samples_per_s": round(v["samples_per_s"]) for k, v in results.items()}))
        return
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"batch {b}, text {cfg.min_len}..{cfg.max_len}, T={cfg.T}")
    print(f"{'sampler':<12} {'compile s':>9} {'ms/batch':>9} {'best ms':>8} {'samples/s':>11} {'best':>11}")
    for name, r in results.items():
        print(f"{name:<12} {r['compile_s']:>9.2f} {r['ms_per_batch']:>9.2f} {r['best_ms']:>8.2f} "
              f"{r['samples_per_s']:>11,.0f} {r['best_samples_per_s']:>11,.0f}")


if __name__ == "__main__":
    main()

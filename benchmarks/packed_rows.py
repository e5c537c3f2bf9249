"""Rows a packed pretraining batch needs over the curriculum, and the row counts a run compiles.

    python benchmarks/packed_rows.py                    # paper preset, batch 512, 21 points, 20 batches each
    python benchmarks/packed_rows.py --batch 64 --points 6

For each curriculum step: the fewest and most rows of ``--batches`` sampled batches (first-fit
decreasing, ``packing.plan_many``) and the row counts they round to (``packing.bucket`` with the
packed step's ``packing.default_row_multiple``, max(4, B/16)), one compiled step each. No training: host and
sampler only, seconds on a CPU.
"""
from __future__ import annotations

import argparse
import collections

import jax
import jax.numpy as jnp
import numpy as np

from configs import pretrain as pretrain_config
from configs.common import SIZES
from safety_mech import data as data_lib
from safety_mech import packing, setups


def rows_over_run(preset: str, batch: int, points: int, batches: int) -> list[dict]:
    """One row per curriculum step (``points`` spread over the preset's run, 0 ... last)."""
    setup = setups.validate_pretrain(pretrain_config.get_config(preset))
    multiple = packing.default_row_multiple(batch)
    lengths = jax.jit(jax.vmap(lambda key, step: packing.needed_lengths(
        data_lib.sample_pretrain_batch(key, setup.data, batch, step)["loss_mask"])))
    total, table = setup.train.steps, []
    for i in range(points):
        step = round(i * total / (points - 1)) if points > 1 else 0
        lengths_MxB = lengths(jax.random.split(jax.random.key(i), batches), jnp.full((batches,), step, jnp.int32))
        _, _, n_rows_M = packing.plan_many(np.asarray(lengths_MxB), setup.data.T - 1)
        table.append({"step": step, "min": int(n_rows_M.min()), "max": int(n_rows_M.max()),
                      "buckets": collections.Counter(packing.bucket(int(n), batch, multiple) for n in n_rows_M)})
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=SIZES)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--points", type=int, default=21, help="curriculum steps, spread over the run")
    parser.add_argument("--batches", type=int, default=20, help="sampled batches per point")
    args = parser.parse_args(argv)
    if min(args.batch, args.points, args.batches) < 1:
        parser.error("--batch, --points and --batches must be >= 1")
    table = rows_over_run(args.preset, args.batch, args.points, args.batches)
    print(f"{args.preset} preset, batch {args.batch}: rows of {args.batches} packed batches per point")
    print("| curriculum step | rows (min-max) | row counts compiled |")
    print("|---|---|---|")
    for r in table:
        print(f"| {r['step']:,} | {r['min']}-{r['max']} | {', '.join(map(str, sorted(r['buckets'])))} |")
    every = sorted(set().union(*(r["buckets"] for r in table)))
    print(f"\n{len(every)} row counts over the run: {', '.join(map(str, every))}")


if __name__ == "__main__":
    main()

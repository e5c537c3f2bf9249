"""Throughput of one pretraining step (sampling inside the jit + forward + backward + AdamW).

    python benchmarks/train_step.py                      # paper model, batch 64, T = 115
    python benchmarks/train_step.py --preset tiny --batch 128
    python benchmarks/train_step.py --json               # {"ms_per_step": ..., "tokens_per_s": ...}
    python benchmarks/train_step.py --baseline           # + a plain Flax GPT step, interleaved
    python benchmarks/train_step.py --no-pack            # the paper preset packs rows; compare
    python benchmarks/train_step.py --data_step 100000   # batches from the curriculum's end
    python benchmarks/train_step.py --whole_run 5 --baseline  # 5 points over the run, + plain Flax
    python benchmarks/train_step.py --batch 512 --dtype float32 --attention einsum --no-pack  # on a GPU

Times are medians over ``--steps`` steps after compilation (each step blocked on). FLOPs per step:
6·N·tokens for the dense layers (N = all parameters, forward + backward) plus 12·L·D·T² per sequence
for the attention scores and the weighted sum (full T×T, as computed). The process first calls
``safety_mech.host_memory.keep_freed_memory`` (as the launchers do; ``--default_malloc`` skips it);
the table reports the minor page faults per step. ``--baseline`` times ``benchmarks/plain_gpt.py``'s
step of the same size in turn with ours (same load) and prints the ratio.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp

from configs import pretrain as pretrain_config
from configs.common import SIZES
from safety_mech import data as data_lib
from safety_mech import host_memory
from safety_mech import losses
from safety_mech import model as model_lib
from safety_mech import optim
from safety_mech import packing
from safety_mech import setups
from safety_mech import train as train_lib


def step_flops(model_cfg: model_lib.ModelConfig, n_params: int, batch: int, seq: int) -> float:
    dense = 6.0 * n_params * batch * seq
    attention = 12.0 * model_cfg.n_layer * model_cfg.d_model * seq * seq * batch
    return dense + attention


def _median_times(fns, n: int) -> list[tuple[float, float]]:
    """For each function: median seconds per call and mean minor page faults per call (the process's,
    all threads). The functions are called in turn, n rounds, so they see the same machine load."""
    times, faults = [[] for _ in fns], [0] * len(fns)
    for _ in range(n):
        for i, fn in enumerate(fns):
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[i].append(time.perf_counter() - t0)
            faults[i] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return [(statistics.median(t), f / n) for t, f in zip(times, faults)]


def _at_step(state: train_lib.TrainState, data_step: int) -> train_lib.TrainState:
    """``state`` with its step counter set to ``data_step``: the step's sampler draws the batch of that
    curriculum step (the learning rate follows the optimizer's own count, which is left alone)."""
    return state._replace(step=jnp.full_like(state.step, data_step))


def _build(preset: str, batch: int, n_replicas: int, pack: bool | None, model: dict | None = None):
    """(setup, step_fn, state, n_params, sample) of the preset's pretraining step, not yet compiled;
    ``n_replicas`` replicas of the preset's learning rate (seeds 0 .. n_replicas − 1); ``model``:
    overrides of the preset's ``model`` keys (e.g. ``dtype``, ``attention``)."""
    cfg = pretrain_config.get_config(preset)
    cfg.model.update(model or {})
    cfg.train.batch_size, cfg.train.seeds = batch, tuple(range(n_replicas))
    cfg.opt.lrs = cfg.opt.lrs[:1]
    if pack is not None:
        cfg.train.pack = pack
    setup = setups.validate_pretrain(cfg)
    optimizer = optim.make_optimizer(setup.opt)
    state = train_lib.init_replicas(setup.opt.lrs, setup.train.seeds,
                                    lambda k: model_lib.init_params(k, setup.model), optimizer)
    n_params = model_lib.count_params(state.params, exclude_head=False) // n_replicas
    sample = lambda key, step: data_lib.sample_pretrain_batch(key, setup.data, batch, step)  # noqa: E731
    lr_fn = optim.make_lr_fn(setup.opt)  # as the launcher's step (train/lr)
    if setup.train.pack:
        step_fn = packing.make_packed_train_step(optimizer, sample, setup.loss, lr_fn=lr_fn)
    else:
        step_fn = train_lib.make_train_step(losses.lm_loss, optimizer, sample, setup.loss, lr_fn=lr_fn)
    return setup, step_fn, state, n_params, sample


def _plain_step_fn(setup, batch: int):
    """benchmarks/plain_gpt.py's step of the same size, as a no-argument callable."""
    import plain_gpt  # benchmarks/plain_gpt.py (this file's directory is on sys.path when run)
    plain_step, plain_state = plain_gpt.make_step(setup.model, batch)
    plain = {"state": plain_state}

    def plain_one():
        plain["state"], loss = plain_step(plain["state"])
        return loss
    return plain_one


def benchmark(preset: str = "paper", batch: int = 64, steps: int = 10, n_replicas: int = 1,
              baseline: bool = False, pack: bool | None = None, data_step: int = 0, model: dict | None = None) -> dict:
    """Times of our pretraining step (and, with ``baseline``, of benchmarks/plain_gpt.py's step of the
    same size, interleaved step by step with ours). ``pack``: None = the preset's ``train.pack``;
    ``data_step``: the curriculum step the batches are drawn at."""
    setup, step_fn, state, n_params, sample = _build(preset, batch, n_replicas, pack, model)
    T = setup.data.T

    t0 = time.perf_counter()
    holder = {"state": step_fn(_at_step(state, data_step))[0]}
    jax.block_until_ready(holder["state"])
    compile_s = time.perf_counter() - t0

    rows = []

    def one():
        holder["state"], metrics = step_fn(holder["state"])
        rows.append(metrics.get("train/packed_rows", batch))
        return metrics

    fns = [one] + ([_plain_step_fn(setup, batch)] if baseline else [])
    for _ in range(2):  # warm (and compile the baseline): the first steps grow the heap (host_memory.py)
        for fn in fns:
            jax.block_until_ready(fn())
    timed = _median_times(fns, steps)
    step_s, step_faults = timed[0]
    sample_jit = jax.jit(sample)
    jax.block_until_ready(sample_jit(jax.random.key(1), data_step))
    sample_s = _median_times([lambda: sample_jit(jax.random.key(2), data_step)], steps)[0][0]

    tokens = batch * T * n_replicas
    rows_run = statistics.median(float(jax.numpy.max(r)) for r in rows[-steps:])
    flops = step_flops(setup.model, n_params, rows_run, T) * n_replicas  # as computed (packed rows)
    return {"device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}",
            "preset": preset, "params": n_params, "batch": batch, "seq_len": T, "replicas": n_replicas,
            "dtype": setup.model.dtype, "attention": setup.model.attention,
            "compile_s": compile_s, "ms_per_step": step_s * 1e3, "page_faults_per_step": step_faults,
            "sample_ms": sample_s * 1e3,
            "tokens_per_s": tokens / step_s, "gflop_per_step": flops / 1e9,
            "gflop_per_s": flops / step_s / 1e9, "pack": setup.train.pack, "rows": rows_run,
            "data_step": data_step, "examples_per_s": batch * n_replicas / step_s,
            **({"baseline_ms_per_step": timed[1][0] * 1e3} if baseline else {})}


def whole_run(preset: str = "paper", batch: int = 64, steps: int = 6, points: int = 5,
              baseline: bool = False, pack: bool | None = None, model: dict | None = None) -> dict:
    """Step times at ``points`` curriculum steps spread evenly over the preset's run (0 ... last), each
    the median of ``steps`` steps (interleaved with the plain Flax step when ``baseline``); the run's
    mean step time is their trapezoid average over the run, which is what the run's wall time follows
    (a packed step's cost grows as the curriculum adds longer examples). One compiled step serves all
    points (its sampler reads the curriculum step from the state)."""
    setup, step_fn, state, n_params, _ = _build(preset, batch, 1, pack, model)
    total = setup.train.steps
    at = [round(i * total / (points - 1)) for i in range(points)] if points > 1 else [0]
    holder = {"state": state}
    rows = []

    def one():
        holder["state"], metrics = step_fn(holder["state"])
        rows.append(metrics.get("train/packed_rows", batch))  # read after timing: no extra sync
        return metrics

    fns = [one] + ([_plain_step_fn(setup, batch)] if baseline else [])
    table = []
    for data_step in at:
        holder["state"] = _at_step(holder["state"], data_step)
        for _ in range(2):  # warm: compiles the row buckets this part of the curriculum needs
            for fn in fns:
                jax.block_until_ready(fn())
        timed = _median_times(fns, steps)
        n_rows = statistics.median(float(jnp.max(r)) for r in rows[-steps:])
        table.append({"data_step": data_step, "rows": n_rows, "ms_per_step": timed[0][0] * 1e3,
                      "gflop_per_s": step_flops(setup.model, n_params, n_rows, setup.data.T) / timed[0][0] / 1e9,
                      **({"baseline_ms_per_step": timed[1][0] * 1e3} if baseline else {})})

    def run_mean(key):
        values = [row[key] for row in table]
        if len(values) == 1:
            return values[0]
        return sum((a + b) / 2 for a, b in zip(values, values[1:])) / (len(values) - 1)

    out = {"preset": preset, "batch": batch, "pack": setup.train.pack, "run_steps": total, "points": table,
           "dtype": setup.model.dtype, "attention": setup.model.attention,
           "run_mean_ms_per_step": run_mean("ms_per_step")}
    if baseline:
        out["run_mean_baseline_ms_per_step"] = run_mean("baseline_ms_per_step")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=SIZES)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of one compiled step (seeds 0 .. N-1)")
    parser.add_argument("--json", action="store_true", help="print one JSON line (ms_per_step, tokens_per_s, compile_s, device, ...)")
    parser.add_argument("--baseline", action="store_true",
                        help="also time benchmarks/plain_gpt.py's step of the same size, interleaved with ours")
    parser.add_argument("--default_malloc", action="store_true",
                        help="leave glibc malloc as it is (compare: safety_mech/host_memory.py)")
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                        help="pack examples into shared rows (default: the preset's train.pack)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the preset's)")
    parser.add_argument("--attention", choices=("einsum", "fused"), help="attention (default: the preset's)")
    parser.add_argument("--data_step", type=int, default=0,
                        help="curriculum step the batches are drawn at (0: the paper curriculum's start)")
    parser.add_argument("--whole_run", type=int, default=0, metavar="POINTS",
                        help="time the step at POINTS curriculum steps spread over the run (0 ... last) "
                             "and print the run's mean step (the wall time follows it)")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error(f"--replicas must be >= 1, got {args.replicas}")
    if args.whole_run < 0:
        parser.error(f"--whole_run must be >= 0 (0: off), got {args.whole_run}")
    if args.whole_run and (args.replicas != 1 or args.data_step):
        parser.error("--whole_run picks its own curriculum steps and times one replica; drop --data_step / --replicas")
    if not args.default_malloc:
        host_memory.keep_freed_memory()  # before the first computation
    model = {k: v for k, v in (("dtype", args.dtype), ("attention", args.attention)) if v}
    if args.whole_run:
        print_whole_run(whole_run(args.preset, args.batch, args.steps, args.whole_run,
                                  args.baseline, args.pack, model), args.json)
        return
    r = benchmark(args.preset, args.batch, args.steps, args.replicas, args.baseline, args.pack, args.data_step, model)
    if args.json:
        print(json.dumps({k: r[k] for k in ("ms_per_step", "tokens_per_s", "compile_s", "device", "dtype",
                                             "attention", "pack", "rows", "gflop_per_s")}))
        return
    rows = [("device", r["device"]), ("preset / params", f"{r['preset']} / {r['params']:,}"),
            ("batch x T x replicas", f"{r['batch']} x {r['seq_len']} x {r['replicas']}"),
            ("compute dtype / attention", f"{r['dtype']} / {r['attention']}"),
            ("data at curriculum step", f"{r['data_step']}"),
            ("rows computed (median)", f"{r['rows']:.0f}" + (" (packed)" if r["pack"] else " (not packed)")),
            ("compile + first step (s)", f"{r['compile_s']:.1f}"),
            ("step (ms, median)", f"{r['ms_per_step']:.1f}"),
            ("  of which sampling alone (ms)", f"{r['sample_ms']:.1f}"),
            ("minor page faults per step", f"{r['page_faults_per_step']:,.0f}"),
            ("examples/s", f"{r['examples_per_s']:,.1f}"),
            ("tokens/s (batch x T)", f"{r['tokens_per_s']:,.0f}"),
            ("GFLOP per step (rows computed)", f"{r['gflop_per_step']:.1f}"),
            ("achieved GFLOP/s", f"{r['gflop_per_s']:.1f}")]
    if args.baseline:
        ratio = r["baseline_ms_per_step"] / r["ms_per_step"]
        rows += [("plain Flax GPT step (ms, median)", f"{r['baseline_ms_per_step']:.1f}"),
                 ("  plain / ours", f"{ratio:.2f}")]
    width = max(len(k) for k, _ in rows)
    print(f"| {'quantity'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


def print_whole_run(r: dict, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(r))
        return
    baseline = "run_mean_baseline_ms_per_step" in r
    print(f"{r['preset']} preset, batch {r['batch']}, {'packed' if r['pack'] else 'not packed'}; "
          f"{len(r['points'])} points over its {r['run_steps']:,} steps")
    print("| curriculum step | rows | ours (ms) | GFLOP/s |" + (" plain Flax (ms) | plain / ours |" if baseline else ""))
    print("|---|---|---|---|" + ("---|---|" if baseline else ""))
    for p in r["points"]:
        line = f"| {p['data_step']:,} | {p['rows']:.0f} | {p['ms_per_step']:.0f} | {p['gflop_per_s']:.0f} |"
        if baseline:
            line += f" {p['baseline_ms_per_step']:.0f} | {p['baseline_ms_per_step'] / p['ms_per_step']:.2f} |"
        print(line)
    line = f"| run mean | | {r['run_mean_ms_per_step']:.0f} | |"
    if baseline:
        ratio = r["run_mean_baseline_ms_per_step"] / r["run_mean_ms_per_step"]
        line += f" {r['run_mean_baseline_ms_per_step']:.0f} | {ratio:.2f} |"
    print(line)


if __name__ == "__main__":
    main()

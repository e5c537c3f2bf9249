"""The paper scale on one GPU in one command: check, time, then run the paper study in parts.

    python3 benchmarks/gpu_paper.py --out OUT                       # checks and timings (~6 min)
    python3 benchmarks/gpu_paper.py --out OUT --skip_checks --study_minutes 9   # the study, part by part
    python benchmarks/gpu_paper.py --out /tmp/gpu_smoke --smoke --study_minutes 2  # the flow, micro, any machine

1. the fast path's tests on the GPU (``tests/test_compute_path.py``: fused attention through
   cuDNN against the einsum attention, bfloat16 training against float32);
2. the paper pretraining step at batch 512 in each variant (``benchmarks/train_step.py``, one
   process each: float32 + einsum attention, bfloat16, + fused attention, + packing) and the plain
   PyTorch GPT of the same architecture (``benchmarks/torch_gpt.py``: torch.compile, bf16 autocast,
   fused AdamW);
3. the real loop: ``launch.pretrain`` of the paper preset for 1000 steps, packed and not, with
   the step time its metrics log (compilation excluded, the host's row planning included);
4. with ``--study_minutes``: ``launch.reproduce`` of ``configs/reproduce.py:paper`` in ``--workdir``
   for that many minutes (it pauses with a checkpoint, exit status 75, and the same command
   continues), only when the loop's step is at most ``--max_step_ms``; a finished study's report
   is packed into ``OUT/report.tar``.

Writes ``OUT/gpu_paper.md`` (tables), ``OUT/gpu_paper.json`` and ``OUT/gpu_paper.log``. Needs the
project's dependencies importable (on a machine without ``ml_collections``, install its wheel first).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

from safety_mech import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
VARIANTS = [  # (label, train_step.py flags)
    ("float32, einsum attention, not packed", ["--dtype", "float32", "--attention", "einsum", "--no-pack"]),
    ("bfloat16, einsum attention, not packed", ["--dtype", "bfloat16", "--attention", "einsum", "--no-pack"]),
    ("bfloat16, fused attention, not packed", ["--dtype", "bfloat16", "--attention", "fused", "--no-pack"]),
    ("bfloat16, fused attention, packed (curriculum start)", ["--dtype", "bfloat16", "--attention", "fused", "--pack"]),
    ("bfloat16, fused attention, packed (curriculum end)",
     ["--dtype", "bfloat16", "--attention", "fused", "--pack", "--data_step", "100000"]),
]


class Log:
    def __init__(self, out: str):
        self.file = open(os.path.join(out, "gpu_paper.log"), "a")

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()


def run(cmd: list[str], log: Log, timeout: float) -> subprocess.CompletedProcess:
    log(f"$ {' '.join(cmd)}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log(f"  timed out after {timeout:.0f} s")
        return subprocess.CompletedProcess(cmd, 124, e.stdout or "", e.stderr or "")
    log(f"  exit {proc.returncode} in {time.perf_counter() - t0:.0f} s")
    if proc.returncode:
        log("  " + "\n  ".join((proc.stdout + proc.stderr).strip().splitlines()[-15:]))
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict | None:
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    return json.loads(lines[-1]) if proc.returncode == 0 and lines else None


def loop_step_ms(workdir: str) -> float | None:
    """Median logged step time of a run (its first logged interval holds warm-up steps: left out)."""
    records = files.MetricsLog(os.path.join(workdir, "metrics.jsonl")).records()
    times = [r["time/step_s"] for r in records if "time/step_s" in r]
    return statistics.median(times[1:] or times) * 1e3 if times else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_paper.md / .json / .log (and report.tar)")
    parser.add_argument("--study_minutes", type=float, default=0, help="minutes of the paper study (0: none)")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "repro_paper"), help="the study's directory")
    parser.add_argument("--skip_checks", action="store_true", help="no tests or timings: the study only")
    parser.add_argument("--max_step_ms", type=float, default=6.0,
                        help="run the study only if the loop's step is at most this (ms)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--smoke", action="store_true",
                        help="the same flow at the micro preset's size (eager torch, batch 8): checks this script")
    args = parser.parse_args()
    preset, batch, loop_steps = ("micro", "8", 20) if args.smoke else ("paper", "512", 1000)
    os.makedirs(args.out, exist_ok=True)
    log, py = Log(args.out), sys.executable
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "preset": preset, "batch": int(batch),
                     "loop_steps": loop_steps}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        smi = "no nvidia-smi"
    results["gpu"] = smi
    log(f"GPU: {results['gpu']}")
    step_ms = None
    if not args.skip_checks:
        tests = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_compute_path.py"], log, 300)
        results["tests"] = (tests.stdout.strip().splitlines() or ["(no output)"])[-1]
        results["steps"] = []
        for label, flags in VARIANTS:
            r = last_json(run([py, "benchmarks/train_step.py", "--preset", preset, "--batch", batch, "--steps",
                               str(args.steps), "--json", *flags], log, 240))
            results["steps"].append({"variant": label, **(r or {})})
        torch = last_json(run([py, "benchmarks/torch_gpt.py", "--preset", preset, "--batch", batch, "--steps",
                               str(args.steps), "--json", *(["--no-compile", "--device", "cpu"] if args.smoke else [])],
                              log, 300))
        results["torch"] = torch or {}
        results["loop"] = {}
        for pack in (True, False):
            wd = os.path.join("/tmp", f"loop_pack_{pack}")
            shutil.rmtree(wd, ignore_errors=True)
            run([py, "-m", "launch.pretrain", "--config", f"configs/pretrain.py:{preset}", "--workdir", wd,
                 f"--config.train.steps={loop_steps}", f"--config.train.log_every={loop_steps // 10}",
                 "--config.train.eval_every=0", "--config.train.ckpt_every=0",
                 f"--config.opt.warmup_steps={loop_steps // 10}", f"--config.opt.decay_end_step={loop_steps}",
                 "--config.eval.n_final=8", "--config.eval.batch_size=8", f"--config.train.pack={pack}"], log, 300)
            results["loop"]["packed" if pack else "not packed"] = loop_step_ms(wd)
        timed = [v for v in results["loop"].values() if v]
        step_ms = min(timed) if timed else None
        write_tables(args.out, results)
    if args.study_minutes:
        if step_ms is not None and step_ms > args.max_step_ms:
            log(f"study not run: the loop's step is {step_ms:.2f} ms > --max_step_ms {args.max_step_ms}")
        else:
            t0 = time.perf_counter()
            proc = run([py, "-m", "launch.reproduce", "--workdir", args.workdir, "--config",
                        f"configs/reproduce.py:{preset}", "--max_minutes", str(args.study_minutes)],
                       log, args.study_minutes * 60 + 120)
            results["study"] = {"exit": proc.returncode, "minutes": round((time.perf_counter() - t0) / 60, 2),
                                "finished": proc.returncode == 0, "paused": proc.returncode == 75}
            timings = os.path.join(args.workdir, "timings.json")
            if os.path.exists(timings):
                results["study"]["timings_s"] = json.load(open(timings))
            report = os.path.join(args.workdir, "report")
            if proc.returncode == 0 and os.path.isdir(report):
                with tarfile.open(os.path.join(args.out, "report.tar"), "w") as tar:
                    tar.add(report, arcname="paper")
                log("report packed into report.tar")
    json.dump(results, open(os.path.join(args.out, "gpu_paper.json"), "w"), indent=1)


def write_tables(out: str, r: dict) -> None:
    lines = [f"GPU: {r['gpu']} ({r['started']})", "", f"tests/test_compute_path.py on the GPU: {r.get('tests')}", "",
             f"| {r['preset']} pretraining step, batch {r['batch']} | ms / step (median) | compile (s) | torch / ours |",
             "|---|---|---|---|"]
    torch_ms = r.get("torch", {}).get("ms_per_step")
    for s in r["steps"]:
        ms = s.get("ms_per_step")
        ratio = f"{torch_ms / ms:.2f}x" if ms and torch_ms else ""
        lines.append(f"| ours: {s['variant']} | {ms:.2f} | {s['compile_s']:.0f} | {ratio} |" if ms else
                     f"| ours: {s['variant']} | failed | | |")
    lines.append(f"| plain PyTorch GPT (torch.compile, bf16 autocast, fused AdamW) | {torch_ms:.2f} | "
                 f"{r['torch']['compile_s']:.0f} | 1.00x |" if torch_ms else "| plain PyTorch GPT | failed | | |")
    lines += ["", f"| launch.pretrain, {r['preset']} preset, {r['loop_steps']} steps | logged ms / step |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" if v else f"| {k} | failed |" for k, v in r["loop"].items()]
    open(os.path.join(out, "gpu_paper.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Crash safety of the whole study: ``launch.reproduce`` killed with SIGKILL at random moments, each
time started again with the same command, then run to the end; its ``results.json`` compared number
by number with an uninterrupted run's.

    python benchmarks/kill_and_resume.py --reference runs/repro/report/results.json \\
        --workdir runs/repro_killed --kills 5 [--config configs/reproduce.py:micro]

Prints one line per kill (the moment and the stage it hit) and the comparison: every number of
``results.json`` but the stage timings and the config. Exits 1 when any number differs.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numbers(x, path=""):
    """``{path: number}`` of every number (booleans as 0 / 1) in a JSON value."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in numbers(val, f"{path}/{key}").items()}
    if isinstance(x, list):
        return {k: v for i, val in enumerate(x) for k, v in numbers(val, f"{path}[{i}]").items()}
    return {path: float(x)} if isinstance(x, (int, float)) else {}


def compare(a: dict, b: dict, skip=("/timings_s", "/config")) -> tuple[int, list[str]]:
    na, nb = ({k: v for k, v in numbers(d).items() if not k.startswith(skip)} for d in (a, b))
    differ = sorted(k for k in set(na) | set(nb) if na.get(k) != nb.get(k))
    return len(set(na) & set(nb)), differ


def last_stage(log: str) -> str:
    stages = [line.split("== ", 1)[1].strip() for line in open(log, errors="replace") if "== " in line]
    return stages[-1] if stages else "(starting)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="results.json of an uninterrupted run of the same config")
    parser.add_argument("--workdir", required=True, help="a new work directory for the killed study")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--min_s", type=float, default=30.0, help="shortest wait before a kill")
    parser.add_argument("--max_s", type=float, default=180.0, help="longest wait before a kill")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--config", default=None, help="--config of launch.reproduce (default: its own)")
    args = parser.parse_args()
    if os.path.exists(args.workdir):
        sys.exit(f"error: --workdir {args.workdir} exists; choose a new directory")
    reference = json.load(open(args.reference))
    command = [sys.executable, "-m", "launch.reproduce", "--workdir", args.workdir]
    command += ["--config", args.config] if args.config else []
    rng = random.Random(args.seed)
    os.makedirs(args.workdir)
    for i in range(1, args.kills + 1):
        log = os.path.join(args.workdir, f"killed_{i}.log")
        with open(log, "w") as out:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            wait = rng.uniform(args.min_s, args.max_s)
            time.sleep(wait)
            finished = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        print(f"kill {i}: after {wait:.0f} s, in '{last_stage(log)}'" + (" (it had already finished)" if finished else ""),
              flush=True)
    t0 = time.perf_counter()
    final = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if final.returncode != 0:
        sys.exit(f"error: the final run failed: {final.stderr.strip().splitlines()[-1]}")
    done = json.load(open(os.path.join(args.workdir, "report", "results.json")))
    n, differ = compare(reference, done)
    print(f"final run: {time.perf_counter() - t0:.0f} s; {n} numbers compared, {len(differ)} differ")
    for key in differ[:10]:
        print(f"  {key}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()

"""Sweeps (safety_mech/sweeps.py, sweep_report.py, launch/sweep.py): writing points, validating every
point before any work, grouping lr / seed points into runs of replicas, the comparison table from
the runs' own records, and a sweep killed with SIGKILL finishing only what was left."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import launch_cli
from configs import reproduce
from safety_mech import files, metrics, sweep_report, sweeps
from safety_mech.runs import RunDir, RunError
from safety_mech.setups import ConfigError

MICRO_SWEEP = os.path.join(launch_cli.ROOT, "configs", "sweeps", "micro_text_length.py")


def _sweep(points, metrics_=("eval/safe/tf_token_acc",), stage="pretrain", **kw):
    return sweeps.Sweep("t", reproduce.get_config("micro"), points, {stage: tuple(metrics_)}, stage, **kw)


def test_axes():
    a, b = sweeps.axis("x", [1, 2]), sweeps.axis("y", [3, 4])
    assert sweeps.product(a, b) == [{"x": 1, "y": 3}, {"x": 1, "y": 4}, {"x": 2, "y": 3}, {"x": 2, "y": 4}]
    assert sweeps.zipped(a, b) == [{"x": 1, "y": 3}, {"x": 2, "y": 4}]
    with pytest.raises(ValueError, match="length"):
        sweeps.zipped(a, sweeps.axis("y", [1]))


def test_t_interval():
    mean, lo, hi = metrics.t_mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and np.isclose(hi - mean, 4.303 / np.sqrt(3)) and np.isclose(mean - lo, hi - mean)
    assert metrics.t_mean_interval([0.5]) == (0.5, 0.5, 0.5)


def test_plan_groups_seeds_into_replicas():
    runs = sweeps.plan(sweeps.load(MICRO_SWEEP))
    assert [r.points for r in runs] == [[0, 1, 2], [3, 4, 5]]
    assert [r.name for r in runs] == ["min_len=6,max_len=6", "min_len=8,max_len=8"]
    assert [tuple(r.config.pretrain.train.seeds) for r in runs] == [(0, 1, 2)] * 2
    assert [r.config.pretrain.data.max_len for r in runs] == [6, 8]


def test_plan_lr_seed_grid_or_separate_runs():
    grid = sweeps.product(sweeps.axis("pretrain.opt.lrs", [1e-3, 3e-3]), sweeps.axis("pretrain.train.seeds", [0, 1]))
    (run,) = sweeps.plan(_sweep(grid))
    assert tuple(run.config.pretrain.opt.lrs) == (1e-3, 3e-3) and tuple(run.config.pretrain.train.seeds) == (0, 1)
    # (lr a, seed 0) and (lr b, seed 1) are not a grid: two runs, named apart
    diagonal = sweeps.zipped(sweeps.axis("pretrain.opt.lrs", [1e-3, 3e-3]), sweeps.axis("pretrain.train.seeds", [0, 1]))
    runs = sweeps.plan(_sweep(diagonal))
    assert [r.points for r in runs] == [[0], [1]] and len({r.name for r in runs}) == 2


def test_pretraining_seeds_are_separate_runs_in_the_finetune_stage():
    """A fine-tuned run has one base: points that differ in the pretraining seed are not replicas there."""
    sweep = _sweep(sweeps.axis("pretrain.train.seeds", [0, 1]), ("ssft/eval/safe/gen_instruct",), "finetune",
                   methods=("ssft",))
    runs = sweeps.plan(sweep)
    assert [r.points for r in runs] == [[0], [1]] and [r.name for r in runs] == ["seeds=0", "seeds=1"]
    assert [tuple(r.config.pretrain.train.seeds) for r in runs] == [(0,), (1,)]


def test_bad_point_fails_before_any_work(tmp_path):
    points = [{"pretrain.train.seeds": s} for s in range(16)] + [{"pretrain.data.min_lenn": 6}]
    workdir = tmp_path / "w"
    with pytest.raises(ConfigError, match=r"^point 17 of 17: unknown key 'pretrain.data.min_lenn'; "
                                          r"did you mean 'pretrain.data.min_len'\?"):
        sweeps.run(_sweep(points), str(workdir))
    assert not workdir.exists()


@pytest.mark.parametrize("points, stage, metric, message", [
    ([{"pretrain.data.min_len": "six"}], "pretrain", "eval/safe/tf_token_acc", r"point 1 of 1: pretrain.data.min_len="),
    ([{"pretrain.data.min_len": 40}], "pretrain", "eval/safe/tf_token_acc", r"point 1 of 1: .*min_len"),
    ([{"finetune.ssft.opt.lrs": 1e-3}], "pretrain", "eval/safe/tf_token_acc", r"--stage pretrain does not run it"),
    ([{"finetune.dpo.opt.lrs": 1e-3}], "finetune", "ssft/eval/safe/gen_instruct", r"methods \('ssft',\)"),
    ([{"pretrain": 1}], "pretrain", "eval/safe/tf_token_acc", r"'pretrain' is a group"),
    ([{}, {}], "pretrain", "eval/safe/tf_token_acc", r"points 1 and 2 are the same"),
    ([{}], "pretrain", "ssft/unsafe/gen_null", r"metric 'ssft/unsafe/gen_null' is not one --stage pretrain gives"),
    ([{}], "study", "findings/no_such_finding", r"metric 'findings/no_such_finding'"),
])
def test_bad_sweeps(points, stage, metric, message):
    with pytest.raises(ConfigError, match=message):
        sweeps.plan(_sweep(points, (metric,), stage, methods=("ssft",)))


def test_points_out_of_range(tmp_path):
    with pytest.raises(ConfigError, match=r"--points \[3\]: the sweep has points 1..2"):
        sweeps.run(_sweep([{}, {"pretrain.train.seeds": 1}]), str(tmp_path / "w"), only=[3])
    assert not (tmp_path / "w").exists()


def test_no_metrics_for_stage():
    with pytest.raises(ConfigError, match="no metrics for --stage finetune"):
        sweeps.plan(_sweep([{}]), "finetune")


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        sweeps.load(str(tmp_path / "missing.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("def get_sweep():\n    return dict(config=1, points=[], metrics=(), stage='pretrain', colour=1)\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\]"):
        sweeps.load(str(bad))
    bad.write_text("def get_sweep():\n    raise KeyError('x')\n")
    with pytest.raises(ConfigError, match="KeyError"):
        sweeps.load(str(bad))


def test_short_keys_and_names():
    short = sweeps.short_keys(["finetune.ssft.opt.lrs", "finetune.dpo.opt.lrs", "pretrain.data.min_len"])
    assert short == {"finetune.ssft.opt.lrs": "ssft.opt.lrs", "finetune.dpo.opt.lrs": "dpo.opt.lrs",
                     "pretrain.data.min_len": "min_len"}
    assert sweeps.name_of({"pretrain.data.min_len": 6, "finetune.dpo.opt.lrs": (1e-3, 2e-4)}, short) == \
        "min_len=6,dpo.opt.lrs=0.001+0.0002"
    assert sweeps.name_of({}, short) == "base"


def test_study_stage_values_from_results_json(tmp_path):
    """A study-stage point reads results.json: its own models' eval keys with their Wilson bounds,
    findings as 1 / 0."""
    sweep = _sweep([{"finetune.ssft.opt.lrs": 2e-3, "finetune.ssft.train.seeds": s} for s in (0, 1)],
                   ("ssft/unsafe/gen_null", "findings/ssft_most_susceptible"), "study")
    (run,) = sweeps.plan(sweep)
    (lr,) = run.config.finetune.ssft.opt.lrs
    ev = {}
    for seed, v in ((0, 0.5), (1, 0.7)):
        key = f"ssft/lr={lr:g}/seed={seed}/unsafe/gen_null"
        ev.update({key: v, f"{key}_lo": v - 0.1, f"{key}_hi": v + 0.1})
    os.makedirs(tmp_path / run.name / "report")
    files.write_json(str(tmp_path / run.name / "report" / "results.json"),
                     {"eval": ev, "findings": {"ssft_most_susceptible": {"held": True}}, "pretrain": {}})
    table = sweep_report.collect(str(tmp_path), sweep, "study", [run])
    p1, p2 = table["points"]
    assert p1["values"]["ssft/unsafe/gen_null"] == {"mean": 0.5, "lo": 0.4, "hi": 0.6, "n": 1}
    assert p2["values"]["findings/ssft_most_susceptible"]["mean"] == 1.0
    (setting,) = table["settings"]
    mean, lo, hi = metrics.t_mean_interval([0.5, 0.7])
    assert setting["values"]["ssft/unsafe/gen_null"] == {"mean": mean, "lo": lo, "hi": hi, "n": 2}
    text = sweep_report.markdown(table)
    assert "0.500 [0.400, 0.600]" in text and "## Over seeds" in text and "{" not in text


def test_finetune_stage_shares_the_base(tmp_path):
    """Two SSFT seeds from one pretrained base: one pretraining run, one fine-tuning run of two replicas,
    the table's values are that run's final record."""
    cfg = reproduce.get_config("micro")
    cfg.finetune.ssft.opt.lrs = (2e-3,)
    sweep = sweeps.Sweep("ft", cfg, sweeps.axis("finetune.ssft.train.seeds", [0, 1]),
                         {"finetune": ("ssft/eval/safe/tf_token_acc",)}, "finetune", methods=("ssft",))
    table = sweeps.run(sweep, str(tmp_path), compilation_cache=False)
    assert sorted(os.listdir(tmp_path / "pretrain")) == ["base"]
    run = RunDir.open(str(tmp_path / "base" / "ssft"))
    assert run.n_replicas == 2 and run.config["base"]["path"] == str(tmp_path / "pretrain" / "base")
    final = run.metrics.final()["eval/safe/tf_token_acc"]
    assert [p["values"]["ssft/eval/safe/tf_token_acc"]["mean"] for p in table["points"]] == final
    assert not os.path.exists(tmp_path / "base" / "dpo")


def _wait_for(path: str, proc, timeout: float = 120) -> None:
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.2)


def test_sweep_launch_killed_and_rerun(tmp_path):
    """The 6-point micro sweep (2 text lengths × 3 seeds): each length is one run of 3 replicas; a
    SIGKILL during the second run, then the same command finishes only that run."""
    workdir = str(tmp_path / "sweep")
    args = [sys.executable, "-m", "launch.sweep", "--sweep", MICRO_SWEEP, "--workdir", workdir]
    proc = subprocess.Popen(args, cwd=launch_cli.ROOT, env=launch_cli.ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first, second = (os.path.join(workdir, "pretrain", n) for n in ("min_len=6,max_len=6", "min_len=8,max_len=8"))
    _wait_for(os.path.join(second, "config.json"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = open(os.path.join(first, "metrics.jsonl")).read()
    assert json.load(open(os.path.join(workdir, "comparison.json")))["n_done"] == 3

    rerun = subprocess.run(args, cwd=launch_cli.ROOT, env=launch_cli.ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "run 1/2 min_len=6,max_len=6 finished earlier, skipped" in rerun.stderr
    assert "run 2/2 min_len=8,max_len=8 (points 4,5,6; 3 of 6 points done" in rerun.stderr
    assert open(os.path.join(first, "metrics.jsonl")).read() == before
    table = json.load(open(os.path.join(workdir, "comparison.json")))
    assert table["n_done"] == 6 and [p["point"] for p in table["points"]] == [1, 2, 3, 4, 5, 6]
    for run_path, points in ((first, table["points"][:3]), (second, table["points"][3:])):
        run = RunDir.open(run_path)
        assert run.config["train"]["seeds"] == [0, 1, 2]
        final = run.metrics.final()["eval/safe/tf_token_acc"]
        assert [p["values"]["eval/safe/tf_token_acc"]["mean"] for p in points] == final
        assert [p["overrides"]["pretrain.train.seeds"] for p in points] == [[0], [1], [2]]
    text = open(os.path.join(workdir, "comparison.md")).read()
    assert "6 of 6 points done" in text and "## Over seeds" in text
    assert os.path.getsize(os.path.join(workdir, "plot.png")) > 0


def test_a_finished_run_of_another_config_is_refused(tmp_path):
    sweep = sweeps.load(MICRO_SWEEP)
    (run, _) = sweeps.plan(sweep)
    d = sweeps.run_dir(str(tmp_path), "pretrain", run)
    os.makedirs(d)
    changed = run.config.pretrain.to_dict()
    changed["train"]["steps"] = 7
    files.write_json(os.path.join(d, "config.json"), changed)
    with pytest.raises(RunError, match=r"holds a run with a different config \(train.steps\)"):
        sweeps.done(str(tmp_path), sweep, "pretrain", run)


def test_sweep_launch_errors(tmp_path):
    line = launch_cli.error_line(launch_cli.run("sweep", "--sweep", str(tmp_path / "none.py"), "--workdir",
                                                str(tmp_path / "w")))
    assert line == f"error: --sweep {tmp_path / 'none.py'}: no such file"
    assert not (tmp_path / "w").exists()
    line = launch_cli.error_line(launch_cli.run("sweep", "--sweep", MICRO_SWEEP, "--stage", "evaluate"))
    assert line.startswith("error: flag --stage=evaluate")

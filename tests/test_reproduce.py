"""The whole study end to end (safety_mech/study.py's reproduce) on the micro preset: every stage
runs, the report has its sections, every number in results.json is finite (or an explicit null), the
verdicts are findings.py's of the numbers saved with them, a rerun skips every stage, and bad configs
fail before any work (from the library and from launch/reproduce.py)."""
import json
import math
import os
import time

import pytest

import launch_cli
from configs import reproduce as reproduce_config
from safety_mech import files, findings, study
from safety_mech.runs import RunDir
from safety_mech.setups import ConfigError

SETS = ("safe", "unsafe", "jb_co_text")
METHODS = ("ssft", "dpo", "unlearn")


def _micro():
    cfg = reproduce_config.get_config("micro")
    cfg.evaluate.sets = SETS
    cfg.analyze.sets = SETS
    return cfg


def _numbers(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("repro"))
    results = study.reproduce(_micro(), workdir)
    return workdir, results


def test_every_stage_and_the_report(study_dir):
    workdir, results = study_dir
    for d in ("pretrain", *METHODS):
        assert RunDir.open(os.path.join(workdir, d)).finished()
        assert os.path.exists(os.path.join(workdir, d, "eval", "metrics.json")) == (d != "pretrain")
    assert os.path.exists(os.path.join(workdir, "analysis", "analysis.json"))
    timings = json.load(open(os.path.join(workdir, "timings.json")))
    assert set(timings) == {"pretrain", "analyze", *(f"{s}/{m}" for s in ("finetune", "evaluate") for m in METHODS)}
    report_dir = os.path.join(workdir, "report")
    text = open(os.path.join(report_dir, "REPORT.md")).read()
    for section in ("## Table (paper-shaped)", "## Findings of SPEC §11", "## Figures"):
        assert section in text
    for _, statement in findings.FINDINGS:  # every finding has a row with a verdict
        row = next(line for line in text.splitlines() if line.startswith(f"| {statement} |"))
        assert any(f"**{v}**" in row for v in ("held", "partly", "not held", "not tested"))
    for fig in results["analysis"]["figures"].values():
        assert os.path.getsize(os.path.join(report_dir, fig)) > 0 and f"]({fig})" in text
    # the seed-mean table and the per-model table: one row per (method, lr) each (one seed in micro),
    # a cell for every column
    rows = [line for line in text.splitlines() if line.startswith(("| ssft", "| dpo", "| unlearn"))]
    assert len(rows) == 12 and all(line.count("|") == 9 for line in rows)
    assert [r.split(" | ")[0] for r in rows[:6]] == [f"| {r.split(' | ')[0][2:]} (1)" for r in rows[6:]]
    on_disk = json.load(open(os.path.join(report_dir, "results.json")))
    assert list(on_disk["findings"]) == [f for f, _ in findings.FINDINGS]
    assert on_disk["config"] == json.loads(json.dumps(_micro().to_dict()))  # the config the study ran
    numbers = list(_numbers({k: v for k, v in on_disk.items() if k != "config"}))
    assert len(numbers) > 500
    bad = [p for p, v in numbers if not math.isfinite(v)]
    assert not bad, bad[:5]
    for m in METHODS:
        assert any(k.startswith(f"{m}/lr=") and k.endswith("/adversarial/gen_strict") for k in on_disk["eval"])
        # the fine-tuning runs' own evaluation: one number per replica
        assert len(on_disk["finetune_final"][m]["eval/safe/gen_instruct"]) == 2
    assert len(on_disk["pretrain"]["eval/safe/gen_instruct"]) == 1
    # the analyses study the inputs the evaluations attacked (no second attack), and say so
    sources = on_disk["analysis"]["meta"]["adversarial_sources"]
    assert len(sources) == 6 and all("eval/adversarial.npz" in s for s in sources.values())
    assert "the inputs each model's evaluation attacked" in text
    assert os.path.isdir(os.path.join(workdir, ".jax_cache")) and os.listdir(os.path.join(workdir, ".jax_cache"))


def test_verdicts_are_the_findings_of_the_saved_numbers(study_dir):
    workdir, results = study_dir
    recomputed = findings.study_findings({k: results[k] for k in ("eval", "analysis", "pretrain")})
    assert recomputed == results["findings"]
    on_disk = json.load(open(os.path.join(workdir, "report", "results.json")))
    assert files.sanitize(recomputed) == on_disk["findings"]  # booleans stay booleans
    f = results["findings"]
    assert all(v["held"] in ("held", "partly", "not held", "not tested") for v in f.values())
    assert f["jailbreaks_succeed_more_than_unsafe"]["held"] != "not tested"  # jb_co_text was evaluated
    assert f["null_rises_instruct_kept"]["held"] != "not tested"
    assert f["strongest_jailbreaks"]["held"] == "not tested"  # 1 of 4 jailbreak sets evaluated
    assert f["tau_separation_ssft_lt_dpo_lt_unlearn"]["held"] != "not tested"  # all three methods
    rel_norms = [mat["rel_norm"] for m, per in results["analysis"]["weights"].items()
                 for layer in per.values() for mat in layer.values()]
    assert len(rel_norms) == 6 * 2  # 6 models, 1 layer of 2 MLP matrices
    assert (f["delta_w_small"]["held"] == "held") == all(v < 0.1 for v in rel_norms)


def test_rerun_skips_finished_stages(study_dir):
    workdir, _ = study_dir
    before = json.load(open(os.path.join(workdir, "timings.json")))
    study.reproduce(_micro(), workdir)
    assert json.load(open(os.path.join(workdir, "timings.json"))) == before


def test_a_corrupt_stage_output_is_redone(study_dir, tmp_path):
    """The evaluation and analysis outputs carry a SHA256SUMS: a byte flipped in one is refused by
    their reader, and a rerun redoes that stage (only) with the same numbers."""
    import shutil

    from safety_mech.runs import RunError, check_stage_output, stage_output_done

    workdir, results = study_dir
    copy = str(tmp_path / "study")
    shutil.copytree(workdir, copy)
    eval_dir = os.path.join(copy, "dpo", "eval")
    assert stage_output_done(eval_dir) and stage_output_done(os.path.join(copy, "analysis"))
    path = os.path.join(eval_dir, "metrics.json")
    text = open(path).read()
    open(path, "w").write(text.replace("0", "1", 1))
    with pytest.raises(RunError, match=r"dpo/eval is corrupt or incomplete \(metrics.json does not match its checksum\)"):
        check_stage_output(eval_dir)
    outputs = {d: os.path.getmtime(os.path.join(copy, d, "eval", "metrics.json")) for d in ("ssft", "unlearn")}
    redone = study.reproduce(_micro(), copy)
    assert open(path).read() == text and stage_output_done(eval_dir)  # the dpo evaluation was redone
    assert {d: os.path.getmtime(os.path.join(copy, d, "eval", "metrics.json")) for d in outputs} == outputs
    assert redone["eval"] == results["eval"] and redone["findings"] == results["findings"]


def test_bad_configs_fail_before_any_work(tmp_path):
    workdir = str(tmp_path / "w")
    cfg = _micro()
    cfg.evaluate.n = 0
    with pytest.raises(ConfigError, match="config.evaluate: n must be >= 1"):
        study.reproduce(cfg, workdir)
    cfg = _micro()
    cfg.finetune.ssft.model.d_model = 7
    with pytest.raises(ConfigError, match="config.model.d_model=7 does not match config.pretrain"):
        study.reproduce(cfg, workdir)
    cfg = _micro()
    cfg.analyze.sets = ("safe", "jb_co_text")
    with pytest.raises(ConfigError, match="safe and unsafe included"):
        study.reproduce(cfg, workdir)
    assert not os.path.exists(workdir)
    last = launch_cli.error_line(launch_cli.run("reproduce", f"--workdir={workdir}", "--config",
                                                "configs/reproduce.py:micro", "--config.pretrain.train.steps=0"))
    assert last == "error: config.train: steps must be >= 1, got 0", last
    assert not os.path.exists(workdir)


def test_killed_at_random_moments_then_rerun(study_dir, tmp_path):
    """Fault injection: ``launch.reproduce`` killed with SIGKILL at three random moments (a seeded
    draw, so every CI run kills at the same ones), each time rerun with the same command; the
    finished study's numbers equal the uninterrupted one's."""
    import random
    import signal
    import subprocess
    import sys
    import time

    reference, results = study_dir
    workdir = str(tmp_path / "killed")
    # the uninterrupted study's compiled programs: the killed runs spend their time running, not compiling
    env = {**launch_cli.ENV, "JAX_COMPILATION_CACHE_DIR": os.path.join(reference, ".jax_cache")}
    sets = "(" + ",".join(f"'{s}'" for s in SETS) + ")"
    args = [sys.executable, "-m", "launch.reproduce", "--config", "configs/reproduce.py:micro", "--workdir", workdir,
            f"--config.evaluate.sets={sets}", f"--config.analyze.sets={sets}"]
    rng = random.Random(0)
    stages = []
    for _ in range(3):
        proc = subprocess.Popen(args, cwd=launch_cli.ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(6.0, 15.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        timings = os.path.join(workdir, "timings.json")
        stages.append(sorted(json.load(open(timings))) if os.path.exists(timings) else [])
    assert stages[-1] != sorted(results["timings_s"]), "the kills came after the study had finished"
    final = subprocess.run(args, cwd=launch_cli.ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    done = json.load(open(os.path.join(workdir, "report", "results.json")))
    expected = files.sanitize({k: results[k] for k in ("pretrain", "finetune_final", "eval", "findings")})
    assert {k: done[k] for k in expected} == expected
    for section in ("weights", "row_space", "tau", "lipschitz", "alpha_sweep"):
        assert done["analysis"][section] == files.sanitize(results["analysis"][section]), section


def test_stages_in_parts_of_a_time_budget(tmp_path):
    """With a deadline a training stage pauses (its time so far kept), and a stage that cannot pause
    starts only as the first stage of a part or while half of the part's budget is left."""
    from safety_mech.train import TimeBudgetReached
    ran, parts = [], iter([True, False])

    def train_part():  # pauses in the first part, finishes in the second
        ran.append("train")
        if next(parts):
            raise TimeBudgetReached("time budget reached at step 3 of 6 (checkpoint saved)")

    for part in range(3):
        stage = study.Stages(str(tmp_path), deadline=0.0)
        try:
            stage("pretrain", "pretrain" in stage.timings, train_part, pausable=True)
            stage("evaluate", "evaluate" in stage.timings, lambda: ran.append("evaluate"))
        except TimeBudgetReached as e:
            assert part < 2 and ("cannot pause" in str(e)) == (part == 1)
    assert ran == ["train", "train", "evaluate"]
    timings = files.read_json(str(tmp_path / "timings.json"))
    assert set(timings) == {"pretrain", "evaluate"}
    ran.clear()
    (tmp_path / "roomy").mkdir()
    stage = study.Stages(str(tmp_path / "roomy"), deadline=time.monotonic() + 600)
    stage("pretrain", False, lambda: ran.append("train"), pausable=True)
    stage("evaluate", False, lambda: ran.append("evaluate"))
    assert ran == ["train", "evaluate"]

"""launch.reproduce end to end on the micro study: every stage runs, the report has its sections,
every number in results.json is finite (or an explicit null), a rerun skips every stage, and bad
configs fail before any work."""
import json
import math
import os

import pytest

from configs import reproduce as reproduce_config
from launch import reproduce
from safety_mech import report as report_lib
from safety_mech.train import ConfigError

SETS = ("safe", "unsafe", "jb_co_text")


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
def study(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("repro"))
    results = reproduce.run(_micro(), workdir)
    return workdir, results


def test_every_stage_and_the_report(study):
    workdir, results = study
    for d in ("pretrain", "ssft", "dpo", "unlearn"):
        assert reproduce.training_finished(os.path.join(workdir, d), json.load(
            open(os.path.join(workdir, d, "config.json")))["train"]["steps"])
    report_dir = os.path.join(workdir, "report")
    text = open(os.path.join(report_dir, "REPORT.md")).read()
    for section in ("## Table (paper-shaped)", "## Findings of SPEC §11", "## Figures"):
        assert section in text
    for _, statement in report_lib.FINDINGS:  # every finding has a row with a verdict
        row = next(line for line in text.splitlines() if line.startswith(f"| {statement} |"))
        assert any(f"**{v}**" in row for v in ("held", "partly", "not held", "not tested"))
    for fig in results["analysis"]["figures"].values():
        assert os.path.getsize(os.path.join(report_dir, fig)) > 0 and f"]({fig})" in text
    # one table row per (method, lr) with a cell for every column
    rows = [line for line in text.splitlines() if line.startswith(("| ssft", "| dpo", "| unlearn"))]
    assert len(rows) == 6 and all(line.count("|") == 9 for line in rows)
    on_disk = json.load(open(os.path.join(report_dir, "results.json")))
    assert set(on_disk["findings"]) == {f for f, _ in report_lib.FINDINGS}
    numbers = list(_numbers({k: v for k, v in on_disk.items() if k != "config"}))
    assert len(numbers) > 500
    bad = [p for p, v in numbers if not math.isfinite(v)]
    assert not bad, bad[:5]
    for m in ("ssft", "dpo", "unlearn"):
        assert any(k.startswith(f"{m}/lr=") and k.endswith("/adversarial/gen_strict") for k in on_disk["eval"])
    # the analyses study the inputs the evaluations attacked (no second attack), and say so
    sources = on_disk["analysis"]["meta"]["adversarial_sources"]
    assert len(sources) == 6 and all("eval/adversarial.npz" in s for s in sources.values())
    assert "the inputs each model's evaluation attacked" in text
    assert os.path.isdir(os.path.join(workdir, ".jax_cache")) and os.listdir(os.path.join(workdir, ".jax_cache"))


def test_verdicts_follow_the_numbers(study):
    _, results = study
    f = results["findings"]["jailbreaks_succeed_more_than_unsafe"]
    checks = [v["jb_co_text"] > v["unsafe"] for v in f["numbers"].values()]
    assert len(checks) == 3  # one per method, at its ηM
    assert f["held"] == ("held" if all(checks) else "not held" if not any(checks) else "partly")
    assert results["findings"]["strongest_jailbreaks"]["held"] == "not tested"  # 1 of 4 sets evaluated
    f = results["findings"]["delta_w_small"]
    assert f["held"] == ("held" if all(v < 0.1 for v in f["numbers"]["max_rel_norm"].values()) else
                         "not held" if all(v >= 0.1 for v in f["numbers"]["max_rel_norm"].values()) else "partly")


def test_rerun_skips_finished_stages(study):
    workdir, _ = study
    before = json.load(open(os.path.join(workdir, "timings.json")))
    reproduce.run(_micro(), workdir)
    assert json.load(open(os.path.join(workdir, "timings.json"))) == before


def test_bad_configs_fail_before_any_work(tmp_path):
    workdir = str(tmp_path / "w")
    cfg = _micro()
    cfg.evaluate.n = 0
    with pytest.raises(ConfigError, match="config.evaluate.n must be >= 1"):
        reproduce.run(cfg, workdir)
    cfg = _micro()
    cfg.finetune.ssft.model.d_model = 7
    with pytest.raises(ConfigError, match="config.model.d_model=7 does not match config.pretrain"):
        reproduce.run(cfg, workdir)
    cfg = _micro()
    cfg.analyze.sets = ("safe", "jb_co_text")
    with pytest.raises(ConfigError, match="safe and unsafe included"):
        reproduce.run(cfg, workdir)
    assert not os.path.exists(workdir)

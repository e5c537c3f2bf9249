"""The benchmark scripts run: ``benchmarks/train_step.py``'s JSON line names the variant it timed,
``benchmarks/gpu_paper.py`` turns its results (a failed variant included) into tables, and
``benchmarks/packed_rows.py`` counts the rows of packed batches over the curriculum."""
import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_json_names_the_variant(capsys):
    _script("train_step").main(["--preset", "micro", "--batch", "4", "--steps", "2", "--json", "--default_malloc",
                                "--dtype", "bfloat16", "--attention", "fused", "--pack"])
    r = json.loads(capsys.readouterr().out)
    assert (r["dtype"], r["attention"], r["pack"]) == ("bfloat16", "fused", True)
    assert r["ms_per_step"] > 0 and 1 <= r["rows"] <= 4 and r["device"].startswith("cpu")
    assert r["tokens_per_s"] == pytest.approx(4 * 28 / r["ms_per_step"] * 1e3)


def test_gpu_paper_tables_and_loop_step(tmp_path):
    gp = _script("gpu_paper")
    (tmp_path / "run").mkdir()
    lines = [{"step": 10, "time/step_s": 0.5}, {"step": 20, "time/step_s": 0.004}, {"step": 30, "time/step_s": 0.002},
             {"step": 30, "final": True}]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert gp.loop_step_ms(str(tmp_path / "run")) == pytest.approx(3.0)  # the warm-up interval left out
    assert gp.loop_step_ms(str(tmp_path / "none")) is None
    results = {"gpu": "H", "started": "now", "tests": "7 passed", "preset": "paper", "batch": 512, "loop_steps": 1000,
               "steps": [{"variant": "bf16", "ms_per_step": 4.0, "compile_s": 20.0}, {"variant": "broken"}],
               "torch": {"ms_per_step": 8.0, "compile_s": 30.0}, "loop": {"packed": 3.0, "not packed": None}}
    gp.write_tables(str(tmp_path), results)
    table = (tmp_path / "gpu_paper.md").read_text()
    assert "| ours: bf16 | 4.00 | 20 | 2.00x |" in table and "| ours: broken | failed | | |" in table
    assert "| packed | 3.00 |" in table and "| not packed | failed |" in table


def test_packed_rows_over_the_run(capsys):
    pr = _script("packed_rows")
    table = pr.rows_over_run("paper", 64, points=3, batches=4)
    assert [r["step"] for r in table] == [0, 50_000, 100_000]
    for r in table:
        assert 1 <= r["min"] <= r["max"] <= 64 and sum(r["buckets"].values()) == 4
        assert all(b % 4 == 0 and r["min"] <= b < r["max"] + 4 for b in r["buckets"])
    assert table[0]["max"] < table[-1]["min"]  # longer examples later in the curriculum need more rows
    pr.main(["--preset", "micro", "--batch", "8", "--points", "2", "--batches", "2"])
    assert "row counts over the run" in capsys.readouterr().out

"""The command-line sampler: JSON fields and values, and the entry point itself."""
import json
import os
import subprocess
import sys

import pytest

import reference as ref
from launch import sample
from safety_mech import data

CFG = data.DataConfig()
N = 512  # the batch size test_data.py compiles for


@pytest.mark.parametrize("name", sample.SETS)
def test_records(name):
    records = sample.sample_records(name, N, 0, 0, CFG)
    for rec in records[:64]:
        json.dumps(rec)
        for field in ("set", "pcfg", "branch", "ops", "text", "unsafe", "true_output", "target"):
            assert field in rec
        assert rec["set"] == name and rec["pcfg"] in (1, 2, 3, 4)
        assert rec["branch"] in ("safe", "unsafe", "mixed") and len(rec["ops"]) == 4
        assert all(t in ref.VOCAB for t in rec["ops"] + rec["text"] + rec["true_output"] + rec["tokens"])
        a, b = ref.true_segments(rec["ops"], rec["text"])
        assert rec["true_output"] == a + ["*^"] + ([] if b is None else b + ["*^"])
        refusal = ["2a"] * len(rec["text"]) + ["*^"]
        if name == "pretrain":
            assert rec["mode"] in data.MODES and rec["target"] == rec["true_output"]
        elif name == "finetune":
            if rec["unsafe"]:
                assert rec["undesired"] == rec["true_output"]
                expected = (a + ["*^"] + refusal) if rec["second_pair"] else refusal
                assert rec["desired"] == rec["target"] == expected
            else:
                assert rec["desired"] == rec["true_output"] and rec["undesired"] == refusal
        else:
            assert rec["unsafe"] == (name != "safe")
            assert rec["target"] == (rec["refusal"] if rec["unsafe"] else rec["true_output"])


def test_entry_point_prints_json_lines():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "launch.sample", "--set", "jb_co_text", "--n", "3",
                          "--json", "--min_len", "5", "--max_len", "8"],
                         capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(lines) == 3 and all(5 <= len(x["text"]) <= 8 for x in lines)
    assert all(x["branch"] == "mixed" and x["unsafe"] for x in lines)


def test_entry_point_rejects_bad_lengths():
    out = subprocess.run([sys.executable, "-m", "launch.sample", "--set", "safe", "--min_len", "9",
                          "--max_len", "3"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode != 0 and "min_len" in out.stderr

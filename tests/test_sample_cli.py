"""The readable examples (safety_mech/examples.py) behind launch/sample.py: JSON fields and values,
and the entry point itself."""
import json

import pytest

import launch_cli
import reference as ref
from safety_mech import data, examples

CFG = data.DataConfig()
N = 512  # the batch size test_data.py compiles for


@pytest.mark.parametrize("name", examples.SETS)
def test_records(name):
    records = examples.sample_records(name, N, 0, 0, CFG)
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
    # the readable form (launch.sample without --json) shows the same fields
    for i, rec in enumerate(records[:8]):
        lines = examples.format_record(i, rec).splitlines()
        assert lines[0].startswith(f"#{i} {name}  pcfg={rec['pcfg']} branch={rec['branch']} unsafe={rec['unsafe']}")
        assert lines[1] == "  ops:    " + " ".join(rec["ops"]) and lines[2] == "  text:   " + " ".join(rec["text"])
        assert lines[3] == "  true:   " + " ".join(rec["true_output"])
        assert lines[-1] == "  tokens: " + " ".join(rec["tokens"])
        assert ("  target: " + " ".join(rec["target"]) in lines) == (rec["target"] != rec["true_output"])


def test_entry_point_prints_json_lines():
    out = launch_cli.run("sample", "--set", "jb_co_text", "--n", "3", "--json", "--min_len", "5", "--max_len", "8")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(lines) == 3 and all(5 <= len(x["text"]) <= 8 for x in lines)
    assert all(x["branch"] == "mixed" and x["unsafe"] for x in lines)


def test_entry_point_rejects_bad_lengths():
    last = launch_cli.error_line(launch_cli.run("sample", "--set", "safe", "--min_len", "9", "--max_len", "3"))
    assert last.startswith("error:") and "min_len" in last

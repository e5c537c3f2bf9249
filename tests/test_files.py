"""safety_mech/files.py: metrics.jsonl (MetricsLog), JSON sanitising, atomic writes."""
import json
import math
import os

import numpy as np
import pytest

from safety_mech import files


def _log(tmp_path, records):
    log = files.MetricsLog(str(tmp_path / "metrics.jsonl"))
    for r in records:
        log.write(r)
    return log


def test_write_and_read_records(tmp_path):
    log = _log(tmp_path, [{"step": 1, "train/loss": np.array([0.5, 0.25], np.float32)},
                          {"step": 2, "eval/safe/gen_instruct": np.array([1.0]), "n": np.int64(3)}])
    assert log.records() == [{"step": 1, "train/loss": [0.5, 0.25]},
                             {"step": 2, "eval/safe/gen_instruct": [1.0], "n": 3}]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(isinstance(json.loads(x), dict) for x in lines)
    assert log.final() == {}
    assert files.MetricsLog(str(tmp_path / "absent.jsonl")).records() == []
    quiet = files.MetricsLog(None)  # writes nothing, reads nothing
    quiet.write({"step": 1})
    quiet.truncate_after(0)
    assert quiet.records() == [] and quiet.final() == {}


def test_final_is_the_last_final_record(tmp_path):
    log = _log(tmp_path, [{"step": 1}, {"step": 2, "final": True, "x": 1.0}, {"step": 3},
                          {"step": 3, "final": True, "x": 2.0}])
    assert log.final() == {"step": 3, "final": True, "x": 2.0}


def test_half_written_last_line_is_skipped(tmp_path):
    log = _log(tmp_path, [{"step": 1, "a": [1.0]}, {"step": 2, "a": [2.0]}])
    with open(log.path, "a") as f:
        f.write('{"step": 3, "a": [3.')  # a kill in the middle of a write
    assert [r["step"] for r in log.records()] == [1, 2]
    # a resumed run appends after it; the cut line stays unreadable, the new ones are read
    with open(log.path, "a") as f:
        f.write("\n")
    log.write({"step": 3, "a": [3.0]})
    assert [r["step"] for r in log.records()] == [1, 2, 3]


def test_truncate_after_replays_what_a_killed_run_wrote(tmp_path):
    log = _log(tmp_path, [{"step": s, "v": s} for s in range(1, 6)] + [{"step": 5, "final": True}])
    with open(log.path, "a") as f:
        f.write('{"step": 6, "v"')  # half written
    log.truncate_after(3)
    assert log.records() == [{"step": s, "v": s} for s in range(1, 4)]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")
    assert not [f for f in os.listdir(tmp_path) if f != "metrics.jsonl"]  # no temporary file left
    log.truncate_after(0)  # a restart from scratch drops everything (records without a step count as 0)
    assert log.records() == []
    files.MetricsLog(str(tmp_path / "never_written.jsonl")).truncate_after(3)  # nothing to truncate
    assert not (tmp_path / "never_written.jsonl").exists()


def test_to_jsonable_and_sanitize():
    assert files.to_jsonable(np.float32(0.5)) == 0.5 and isinstance(files.to_jsonable(np.int32(3)), int)
    assert files.to_jsonable(np.array([1, 2])) == [1, 2] and files.to_jsonable(np.bool_(True)) is True
    bad = []
    out = files.sanitize({"a": {"b": [1.0, float("nan")], "c": np.float32(np.inf)}, "d": np.arange(2),
                          "e": (True, "x"), 3: np.int64(4)}, "", bad)
    assert out == {"a": {"b": [1.0, None], "c": None}, "d": [0, 1], "e": [True, "x"], "3": 4}
    assert bad == ["/a/b[1]", "/a/c"]
    assert isinstance(out["3"], int) and json.dumps(out)


def test_atomic_writes(tmp_path):
    path = str(tmp_path / "x.json")
    files.write_json(path, {"a": [1, 2]})
    assert files.read_json(path) == {"a": [1, 2]}
    with pytest.raises(ValueError):
        files.write_json(path, {"a": math.nan})  # NaN is rejected, the old file kept
    assert files.read_json(path) == {"a": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["x.json"]
    files.write_text(str(tmp_path / "t.md"), "hello\n")
    assert (tmp_path / "t.md").read_text() == "hello\n"
    files.write_npz(str(tmp_path / "a.npz"), {"soft": np.ones((2, 3), np.float32)})
    with np.load(tmp_path / "a.npz") as f:
        np.testing.assert_array_equal(f["soft"], np.ones((2, 3)))
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "t.md", "x.json"]


def _scalars(logdir) -> dict:
    """{(tag, step): value} of every scalar in a directory's TensorBoard event files (TFRecord)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out[(v.tag, event.step)] = v.simple_value
    return out


def test_tensorboard_mirror_writes_every_replica(tmp_path):
    mirror = files.TensorBoardMirror.open(str(tmp_path / "tb"), ["lr=0.001,seed=0", "lr=0.001,seed=1"])
    log = files.MetricsLog(str(tmp_path / "metrics.jsonl"), mirror)
    log.write({"step": 5, "train/loss": np.array([0.5, 0.25]), "time/step_s": 0.1})
    log.write({"step": 10, "final": True, "eval/safe/gen_instruct": [1.0, 0.75]})
    assert [r["step"] for r in log.records()] == [5, 10]
    assert sorted(os.listdir(tmp_path / "tb")) == ["lr=0.001,seed=0", "lr=0.001,seed=1"]
    second = _scalars(tmp_path / "tb" / "lr=0.001,seed=1")
    assert second == {("train/loss", 5): 0.25, ("time/step_s", 5): pytest.approx(0.1),
                      ("eval/safe/gen_instruct", 10): 0.75}

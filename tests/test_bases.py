"""The pretrained base shipped with the package (safety_mech/bases/): its files match their
checksums, it is the run configs/pretrain.py:tiny describes, and it follows instructions."""
import os
import shutil

import jax
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from configs import reproduce as reproduce_config
from safety_mech import bases, metrics, setups, study
from safety_mech.runs import RunDir, RunError, config_diff


def test_the_default_study_starts_from_a_shipped_base_of_its_pretraining_config():
    cfg = reproduce_config.get_config("tiny")
    assert cfg.base in bases.names()
    assert study.shipped_base(cfg) == bases.path(cfg.base)
    run = RunDir.open(bases.path(cfg.base))
    assert not config_diff(run.config, pretrain_config.get_config("tiny").to_dict())
    assert run.finished()


def test_the_shipped_base_follows_instructions():
    run = RunDir.open(bases.path("tiny"))
    setup = run.setup
    ev = metrics.make_instruct_eval(setup.model, setup.data, jax.random.key(setup.eval.seed), 1000, sets=("safe",))
    instruct = float(np.asarray(ev(run.load_params())["eval/safe/gen_instruct"])[0])
    assert instruct >= 0.99, instruct


def test_a_corrupt_or_incomplete_copy_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "tiny"
    shutil.copytree(bases.path("tiny"), copy)
    monkeypatch.setattr(bases, "__file__", str(tmp_path / "__init__.py"))
    assert bases.path("tiny") == str(copy)
    largest = max((p for p in copy.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x01
    largest.write_bytes(bytes(data))
    with pytest.raises(RunError, match="checksum"):
        bases.path("tiny")
    largest.unlink()
    with pytest.raises(RunError, match="missing"):
        bases.path("tiny")
    with pytest.raises(RunError, match="no shipped base"):
        bases.path("nope")


def test_a_study_whose_pretraining_config_is_not_the_shipped_base_says_so():
    cfg = reproduce_config.get_config("tiny")
    cfg.pretrain.train.steps = 7
    with pytest.raises(setups.ConfigError, match="config.base=''"):
        study.shipped_base(cfg)
    cfg.base = ""
    assert study.shipped_base(cfg) is None

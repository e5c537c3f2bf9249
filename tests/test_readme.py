"""The README's notebook example runs as written on a study's run directories (a micro study's
pretraining and SSFT runs laid out as ``runs/repro``), and training wrote TensorBoard events of
every replica beside metrics.jsonl."""
import os
import re

import matplotlib

matplotlib.use("Agg")

from configs import finetune as ft_config  # noqa: E402
from configs import pretrain as pt_config  # noqa: E402
from launch_cli import ROOT  # noqa: E402
from safety_mech import study  # noqa: E402


def _notebook_example() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## In a notebook"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_notebook_example_runs(tmp_path, monkeypatch, capsys):
    repro = tmp_path / "runs" / "repro"
    study.pretrain(pt_config.get_config("micro"), str(tmp_path / "base"))
    ssft = ft_config.get_config("ssft:micro")
    ssft.train.seeds = (0, 1)
    study.finetune(ssft, str(tmp_path / "base"), str(repro / "ssft"))
    monkeypatch.chdir(tmp_path)  # the example's relative paths: runs/repro/..., tau.png
    exec(compile(_notebook_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "ssft/lr=0.002/seed=0" in out and "ssft/lr=0.0002/seed=1" in out
    assert os.path.getsize(tmp_path / "tau.png") > 0
    assert sorted(os.listdir(repro / "ssft" / "tensorboard")) == sorted(
        f"lr={lr:g},seed={s}" for lr in ssft.opt.lrs for s in (0, 1))

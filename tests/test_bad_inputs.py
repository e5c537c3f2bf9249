"""Bad input, every row of docs/bad_inputs.md: one line that names the problem and the fix, a
non-zero exit, and nothing written (the would-be work directory not created, every input directory
byte-for-byte unchanged).

Library calls run in-process through ``cli.main`` (a launcher's ``main`` is flags -> that wrapper ->
one library call); only the rows that need flag parsing run a launcher as a process. The run
directories are written once per module, at freshly initialised params (tests/run_dirs.py): every
row fails before any training step."""
import builtins
import collections
import errno
import hashlib
import json
import os
import re
import shutil

import jax
import ml_collections
import numpy as np
import pytest

import launch_cli
import run_dirs
from configs import analyze as an_config
from configs import evaluate as ev_config
from configs import reproduce as repro_config
from safety_mech import cli, convert, grammar, host_memory, setups, study, sweeps
from safety_mech.analysis import realmodels
from safety_mech.analysis.suite import AnalysisConfig
from safety_mech.evaluation import EvaluationConfig
from test_convert import CFG as REF_CFG
from test_convert import _ref_state_dict
from test_finetune_launch import _micro_finetune_config
from test_realmodels import _checkpoints, _save

Launch = collections.namedtuple("Launch", "module args")  # a row run as `python -m launch.<module> args`
ROWS = {}  # name -> (regex the error line must match, fn(runs, workdir, monkeypatch) -> run_fn or Launch)
LAUNCHED = []  # the rows run as processes
MICRO = "configs/pretrain.py:micro"
UP = "model.layers.0.mlp.up_proj.weight"
SWEEP = '''from configs import reproduce
from safety_mech import sweeps


def get_sweep():
    points = sweeps.axis("pretrain.train.seeds", list(range(16))) + [{"pretrain.data.max_lenn": 5}]
    return dict(config=reproduce.get_config("micro"), points=points, metrics=("train/loss",), stage="pretrain")
'''


def row(pattern: str, launched: bool = False):
    """Register a row: the decorated function builds its call (a :class:`Launch` when ``launched``),
    ``pattern`` is what the line says."""
    def register(fn):
        ROWS[fn.__name__] = (pattern, fn)
        LAUNCHED.extend([fn.__name__] if launched else [])
        return fn
    return register


@pytest.fixture(autouse=True)
def no_malloc_settings(monkeypatch):
    """cli.main configures malloc for the launcher's process; not for the test process."""
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: False)


def _edit_json(path, fn):
    with open(path) as f:
        obj = json.load(f)
    fn(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The inputs the rows read, under one root: micro runs (one replica, two replicas, params of
    REF's 59-token vocabulary, a NaN, a config.json that is not its params' model, a flipped byte),
    safetensors pairs and a sweep file (the REF .pt files: their rows)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    cfg = run_dirs.micro_pretrain_config()
    r = {"root": str(root), "empty": str(root / "empty")}
    os.makedirs(r["empty"])
    r["base"] = run_dirs.write_pretrain_run(root / "base", cfg)
    r["two"] = run_dirs.write_pretrain_run(root / "two", run_dirs.micro_pretrain_config(lrs=(1e-3, 1e-4)))

    def ref_vocab(p):  # REF's fine-tuned checkpoints have 59 tokens (5 never-trained duplicates)
        p["wte"]["embedding"] = np.concatenate([p["wte"]["embedding"], p["wte"]["embedding"][:, :5]], axis=1)
        p["lm_head"]["kernel"] = np.concatenate([p["lm_head"]["kernel"], p["lm_head"]["kernel"][..., :5]], axis=2)
        return p

    def nan(p):
        p["ln_f"]["scale"][0, 3] = np.nan
        return p

    r["vocab"] = run_dirs.write_pretrain_run(root / "vocab", cfg, params_fn=ref_vocab)
    r["nan"] = run_dirs.write_pretrain_run(root / "nan", cfg, params_fn=nan)
    r["shape"] = str(shutil.copytree(r["base"], root / "shape"))
    _edit_json(os.path.join(r["shape"], "config.json"), lambda c: c["model"].update(d_mlp=64))
    r["corrupt"] = str(shutil.copytree(r["base"], root / "corrupt"))
    params = [p for p in (root / "corrupt" / "checkpoints").rglob("*") if p.is_file() and "params" in p.parts]
    largest = max(params, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x01
    largest.write_bytes(bytes(data))
    base, tuned = _checkpoints()
    r["st_base"] = str(_save(base, root / "st_base.safetensors")[0])
    r["st_shape"] = str(_save({**tuned, UP: tuned[UP][:-1]}, root / "st_shape.safetensors")[0])
    r["st_dtype"] = str(_save({k: v.astype(np.float16) for k, v in tuned.items()}, root / "st_dtype.safetensors")[0])
    r["sweep"] = str(root / "sweep17.py")
    with open(r["sweep"], "w") as f:
        f.write(SWEEP)
    return r


def _pretrain(work, **groups):
    """study.pretrain of the micro config with ``groups`` ({group: {key: value}}) updated."""
    cfg = run_dirs.micro_pretrain_config()
    for group, values in groups.items():
        cfg[group].update(values)
    return lambda: study.pretrain(cfg, work)


def _finetune(work, base, base_replica=None, **groups):
    cfg = _micro_finetune_config("ssft")
    for group, values in groups.items():
        cfg[group].update(values)
    return lambda: study.finetune(cfg, base, work, base_replica=base_replica)


def _ref_file(r, name: str, edit) -> str:
    """A REF ``.pt`` file of test_convert's state_dict after ``edit(state_dict)`` (torch: optional)."""
    torch = pytest.importorskip("torch")
    path = os.path.join(r["root"], f"{name}.pt")
    sd = _ref_state_dict()
    edit(sd)
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
    return path


def _from_dict(work, edit):
    """study.pretrain of a config built from a dict (a notebook, a JSON file): no ConfigDict types."""
    d = run_dirs.micro_pretrain_config().to_dict()
    edit(d)
    cfg = ml_collections.ConfigDict(d)
    return lambda: study.pretrain(cfg, work)


def _refuse_writes(monkeypatch, under: str, code: int) -> None:
    """Creating any directory or file under ``under`` fails with ``code`` (EACCES: a read-only
    directory, as root cannot have one; ENOSPC: a full disk)."""
    real_mkdir, real_os_open, real_open = os.mkdir, os.open, builtins.open

    def refuse(path):
        if os.path.abspath(os.fsdecode(path)).startswith(under):
            raise OSError(code, os.strerror(code), os.fsdecode(path))

    def mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)


# -- flags: a launcher as its own process ------------------------------------------------------

@row(r"^error: --config\.opt\.lrr=0\.1: config\.opt has no key 'lrr'; did you mean config\.opt\.lrs\?$", launched=True)
def flag_unknown_key(r, work, mp):
    return Launch("pretrain", ("--config", MICRO, f"--workdir={work}", "--config.opt.lrr=0.1"))


@row(r"^error: --config\.trian\.steps=3: config has no key 'trian'; did you mean config\.train\?$", launched=True)
def flag_unknown_group(r, work, mp):
    return Launch("pretrain", ("--config", MICRO, f"--workdir={work}", "--config.trian.steps=3"))


@row(r"^error: flag --config\.train\.steps=abc: invalid literal for int\(\)", launched=True)
def flag_wrong_type(r, work, mp):
    return Launch("pretrain", ("--config", MICRO, f"--workdir={work}", "--config.train.steps=abc"))


@row(r"^error: --config: ValueError: unknown preset 'huge'; use one of \('tiny', 'paper', 'micro'\)$", launched=True)
def unknown_preset(r, work, mp):
    return Launch("pretrain", ("--config", "configs/pretrain.py:huge", f"--workdir={work}"))


@row(r"^error: --workdir required$", launched=True)
def missing_flag(r, work, mp):
    return Launch("pretrain", ("--config", MICRO))


@row(r"^error: unexpected arguments \['extra'\]$", launched=True)
def positional_argument(r, work, mp):
    return Launch("pretrain", ("--config", MICRO, f"--workdir={work}", "extra"))


# -- configs ---------------------------------------------------------------------------------

@row(r"^error: config groups must be \('data', 'model', 'opt', 'train', 'eval', 'loss'\); "
     r"unknown \['trian'\], missing \['train'\]$")
def top_level_group(r, work, mp):
    return _from_dict(work, lambda d: d.update(trian=d.pop("train")))


@row(r"^error: unknown key\(s\) config\.opt\.\{lrr\}; valid keys: .*\blrs\b")
def nested_key(r, work, mp):
    return _pretrain(work, opt=dict(lrr=1e-3))


@row(r"^error: config\.finetune\.ssft: unknown key\(s\) config\.opt\.\{lrr\}; valid keys: .*\blrs\b")
def study_finetune_key(r, work, mp):
    cfg = repro_config.get_config("micro")
    with cfg.finetune.ssft.opt.unlocked():
        cfg.finetune.ssft.opt.lrr = 1e-3
    return lambda: study.reproduce(cfg, work)


@row(r"^error: config\.train\.batch_size='8' is a str, expected int$")
def wrong_type(r, work, mp):
    return _from_dict(work, lambda d: d["train"].update(batch_size="8"))


@row(r"^error: config\.data: DataConfig: p_four_iid must be a probability in \[0, 1\], got 1\.5$")
def p_four_iid_above_one(r, work, mp):
    return _pretrain(work, data=dict(p_four_iid=1.5))


@row(r"^error: config\.data: DataConfig: p_unsafe must be a probability in \[0, 1\], got -0\.1$")
def p_unsafe_negative(r, work, mp):
    return _finetune(work, r["base"], data=dict(p_unsafe=-0.1))


@row(r"^error: config\.opt: lrs must be one or more learning rates > 0, got \(0\.0,\)$")
def zero_learning_rate(r, work, mp):
    return _pretrain(work, opt=dict(lrs=(0.0,)))


@row(r"^error: config\.opt: lrs must be one or more learning rates > 0, got \(-0\.001,\)$")
def negative_learning_rate(r, work, mp):
    return _finetune(work, r["base"], opt=dict(lrs=(-1e-3,)))


@row(r"^error: config\.data: DataConfig: need 1 <= min_len <= max_len, got min_len=5, max_len=4$")
def min_len_above_max_len(r, work, mp):
    return _pretrain(work, data=dict(min_len=5))


@row(r"^error: config\.data: DataConfig: seq_len=12 cannot hold max_len=4; use seq_len >= 22 or 0 \(automatic\)$")
def seq_len_too_short(r, work, mp):
    return _pretrain(work, data=dict(seq_len=12))


@row(r"^error: config\.train\.batch_size: batch size 9 is not divisible by the 4 devices of the mesh; "
     r"use a multiple of 4$")
def batch_size_not_divisible(r, work, mp):
    assert jax.device_count() == 4  # tests/conftest.py
    return _pretrain(work, train=dict(batch_size=9))


# -- base runs and work directories ----------------------------------------------------------

@row(r"^error: --base .*/empty: no config\.json \(not a run directory\)$")
def base_not_a_run(r, work, mp):
    return _finetune(work, r["empty"])


@row(r"^error: config\.model\.d_model=32 does not match --base .*/base \(model\.d_model=16\); "
     r"fine-tuning keeps the base run's model and data$")
def base_other_model_shape(r, work, mp):
    return _finetune(work, r["base"], model=dict(d_model=32))


@row(r"^error: --base .*/vocab: params\['lm_head'\]\['kernel'\] is float32\[1, 16, 59\], "
     r"expected float32\[1, 16, 54\] \(1 replica\(s\)\)$")
def base_params_other_vocabulary(r, work, mp):
    return _finetune(work, r["vocab"])


@row(r"^error: --base .*/shape: params\['h_0'\]\['mlp'\]\['c_fc'\]\['bias'\] is float32\[1, 32\], "
     r"expected float32\[1, 64\]")
def base_params_not_its_config(r, work, mp):
    return _finetune(work, r["shape"])


@row(r"^error: replica 2 outside 0\.\.1 \(--base .*/two has 2\)$")
def base_replica_out_of_range(r, work, mp):
    return _finetune(work, r["two"], base_replica=2)


@row(r"^error: --base and --workdir are the same directory$")
def base_is_workdir(r, work, mp):
    return _finetune(r["base"], r["base"])


@row(r"^error: .*/base holds a run with a different config \(train\.steps\); use a new --workdir$")
def workdir_other_config(r, work, mp):
    return _pretrain(r["base"], train=dict(steps=6))


@row(r"^error: --base .*/corrupt: checkpoint .* is corrupt: params/.* does not match its checksum; "
     r"retrain the run or restore its files$")
def corrupt_checkpoint(r, work, mp):
    return _finetune(work, r["corrupt"])


@row(r"^error: --base .*/nan: params\['ln_f'\]\['scale'\] at step 0 holds NaN or inf; retrain the run")
def nan_params(r, work, mp):
    return _finetune(work, r["nan"])


# -- converted and compared checkpoints ------------------------------------------------------

@row(r"^error: 'transformer\.h\.0\.attn\.c_attn\.weight' has shape \(36, 13\), expected \(36, 12\); "
     r"pass a cfg that matches the checkpoint")
def ref_wrong_shape(r, work, mp):
    C = REF_CFG.d_model
    wrong = {"transformer.h.0.attn.c_attn.weight": np.zeros((3 * C, C + 1), np.float32)}
    path = _ref_file(r, "ref_shape", lambda sd: sd.update(wrong))
    return lambda: convert.load_ref_checkpoint(path, REF_CFG)


@row(r"^error: missing key 'lm_head\.weight' in the REF state_dict .*; use a complete REF checkpoint$")
def ref_missing_key(r, work, mp):
    path = _ref_file(r, "ref_missing", lambda sd: sd.pop("lm_head.weight"))
    return lambda: convert.load_ref_checkpoint(path, REF_CFG)


@row(rf"^error: {re.escape(UP)}: shape \(48, 16\) in .* but \(47, 16\) in .*; compare checkpoints of one architecture$")
def safetensors_shapes(r, work, mp):
    return lambda: realmodels.analyze_checkpoints(r["st_base"], r["st_shape"], pattern="up_proj")


@row(rf"^error: {re.escape(UP)}: dtype F32 in .* but F16 in .*; save both checkpoints in one dtype$")
def safetensors_dtypes(r, work, mp):
    return lambda: realmodels.analyze_checkpoints(r["st_base"], r["st_dtype"], pattern="up_proj")


# -- the machine and the package --------------------------------------------------------------

@row(r"^error: cannot write .*/w: Permission denied; make it writable or choose another directory$")
def unwritable_workdir(r, work, mp):
    _refuse_writes(mp, os.path.dirname(work), errno.EACCES)
    return _pretrain(work)


@row(r"^error: cannot write .*/w: No space left on device; free space or choose another directory$")
def full_disk(r, work, mp):
    _refuse_writes(mp, os.path.dirname(work), errno.ENOSPC)
    return _finetune(work, r["base"])


@row(r"^error: cannot read the grammar file .*no_such_grammars\.json: No such file or directory; "
     r"reinstall the package")
def missing_grammar_file(r, work, mp):
    mp.setattr(grammar, "GRAMMAR_FILE", "no_such_grammars.json")
    return _pretrain(work)


# -- sweeps, evaluation, analysis ------------------------------------------------------------

@row(r"^error: point 17 of 17: unknown key 'pretrain\.data\.max_lenn'; did you mean 'pretrain\.data\.max_len'\?$")
def sweep_point_17(r, work, mp):
    return lambda: sweeps.run(sweeps.load(r["sweep"]), work)


@row(r"^error: config: n must be >= 1, got 0$")
def evaluation_n_zero(r, work, mp):
    cfg = ev_config.get_config("tiny")
    cfg.n = 0
    return lambda: study.evaluate(r["base"], setups.validate_flat(EvaluationConfig, cfg, None))


@row(r"^error: config: sets \['safe', 'jb_co_text'\]: distinct names of .*, safe and unsafe included$")
def analysis_without_unsafe(r, work, mp):
    cfg = an_config.get_config("tiny")
    cfg.sets = ("safe", "jb_co_text")
    return lambda: study.analyze(r["base"], [r["base"]], work, setups.validate_flat(AnalysisConfig, cfg, None))


# -- the check ---------------------------------------------------------------------------------

def snapshot(root: str) -> dict | None:
    """Every directory and file under ``root`` (files by digest); None when ``root`` does not exist."""
    if not os.path.exists(root):
        return None
    out = {}
    for d, _, fs in os.walk(root):
        out[os.path.relpath(d, root) + os.sep] = ""
        for f in fs:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def error_line(call) -> str:
    """The line a user sees and the exit status is not 0: a process's last stderr line, or the
    ``SystemExit`` of ``cli.main`` (a string code exits with status 1)."""
    if isinstance(call, Launch):
        proc = launch_cli.run(call.module, *call.args)
        line = launch_cli.error_line(proc)  # asserts a non-zero exit status
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return line
    with pytest.raises(SystemExit) as e:
        cli.main(["prog"], (), call)
    assert isinstance(e.value.code, str), e.value.code
    return e.value.code


def test_rows():
    """At least 27 rows, at most 7 of them processes (the flag rows), each row in docs/bad_inputs.md."""
    assert len(ROWS) >= 27 and len(LAUNCHED) <= 7, LAUNCHED
    with open(os.path.join(launch_cli.ROOT, "docs", "bad_inputs.md")) as f:
        documented = re.findall(r"^\| \d+ \| `(\w+)`", f.read(), re.M)
    assert documented == list(ROWS)


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(name, runs, tmp_path, monkeypatch):
    pattern, make = ROWS[name]
    work = str(tmp_path / "w")
    call = make(runs, work, monkeypatch)  # may write a row's input file: before the snapshots
    before = snapshot(runs["root"]), snapshot(str(tmp_path))
    assert isinstance(call, Launch) == (name in LAUNCHED)
    line = error_line(call)
    assert line.startswith("error: ") and "\n" not in line, line
    assert re.search(pattern, line), line
    assert not os.path.exists(work)
    monkeypatch.undo()  # reading the snapshots must not go through a patched open
    assert (snapshot(runs["root"]), snapshot(str(tmp_path))) == before

"""Checkpoints: a killed and resumed run ends bit-identical to an uninterrupted one; bad checkpoints
are one-line errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import train_toy as toy
from safety_mech import checkpoint, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N_STEPS, CKPT_EVERY, KILL_AT = 8, 3, 5


class Killed(Exception):
    pass


def _run(workdir, step_fn, kill_at=None):
    """Train to N_STEPS in ``workdir`` (resuming from its checkpoints); ``kill_at``: die while
    dispatching that update, like a preempted job."""
    manager = checkpoint.make_checkpoint_manager(checkpoint.checkpoint_dir(workdir))
    state = toy.init_state(jax.random.key(11))
    if manager.latest_step() is not None:
        state = checkpoint.restore_state(manager, state)

    def maybe_dying_step(s, ref=None):
        if kill_at is not None and train.host_step(s) + 1 == kill_at:
            raise Killed()
        return step_fn(s, ref)

    try:
        state, _ = train.train(maybe_dying_step, state, n_steps=N_STEPS, workdir=workdir, log_every=1,
                               save_fn=lambda s: checkpoint.save_state(manager, s), ckpt_every=CKPT_EVERY)
    finally:
        manager.close()
    return state


def _records(workdir):
    lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")} for x in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and a run killed at step KILL_AT then resumed."""
    step_fn = toy.shared_step()
    full_dir, resumed_dir = (str(tmp_path_factory.mktemp(n)) for n in ("full", "resumed"))
    full = _run(full_dir, step_fn)
    with pytest.raises(Killed):
        _run(resumed_dir, step_fn, kill_at=KILL_AT)
    assert checkpoint.latest_step(checkpoint.checkpoint_dir(resumed_dir)) == CKPT_EVERY
    resumed = _run(resumed_dir, step_fn)
    return full_dir, full, resumed_dir, resumed


def test_resume_is_bit_identical(runs):
    full_dir, full, resumed_dir, resumed = runs
    assert train.host_step(resumed) == N_STEPS
    assert toy.tree_equal(full.params, resumed.params)
    assert toy.tree_equal(full.opt_state, resumed.opt_state)
    # metrics.jsonl of the resumed run: what the killed run logged past its checkpoint is replayed,
    # never duplicated, and equals the uninterrupted run's log line for line
    full_records, resumed_records = _records(full_dir), _records(resumed_dir)
    assert [r["step"] for r in resumed_records] == list(range(1, N_STEPS + 1))
    assert resumed_records == full_records


def test_load_params_is_a_plain_dict(runs):
    full_dir, full, _, _ = runs
    params = checkpoint.load_params(full_dir)
    assert isinstance(params, dict) and isinstance(params["h_0"]["mlp"], dict)
    assert params["wte"]["embedding"].shape == (1, toy.MODEL.vocab_size, toy.MODEL.d_model)  # replica axis
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(int(s) for s in os.listdir(checkpoint.checkpoint_dir(full_dir)) if s.isdigit()) == [6, 8]


def test_missing_checkpoint_is_one_line_error(tmp_path):
    manager = checkpoint.make_checkpoint_manager(str(tmp_path / "checkpoints"))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint found") as err:
        checkpoint.restore_state(manager, toy.init_state(jax.random.key(0)))
    assert "\n" not in str(err.value)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint directory"):
        checkpoint.load_params(str(tmp_path / "nowhere"))
    assert checkpoint.latest_step(str(tmp_path / "nowhere")) is None


def test_corrupt_checkpoint_is_one_line_error(tmp_path):
    manager = checkpoint.make_checkpoint_manager(str(tmp_path / "checkpoints"))
    state = toy.init_state(jax.random.key(0))
    checkpoint.save_state(manager, state)
    step_dir = tmp_path / "checkpoints" / "0"
    for root, _, files in os.walk(step_dir):  # truncate every data file of the checkpoint
        for name in files:
            with open(os.path.join(root, name), "w") as f:
                f.write("garbage")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint that verifies") as err:
        checkpoint.restore_state(manager, state)
    assert "\n" not in str(err.value)
    with pytest.raises(checkpoint.CheckpointError, match="is corrupt: SHA256SUMS is not a manifest"):
        checkpoint.load_params(str(tmp_path))


def _flip_middle_byte(path) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def test_flipped_bytes_are_corruption(runs, tmp_path):
    """A byte flipped in the middle of any of the three largest params files of the last checkpoint:
    loading its params names the file; resuming skips to the previous checkpoint and says so."""
    import shutil

    from absl import logging as absl_logging

    full_dir, full, _, _ = runs
    params_dir = os.path.join(checkpoint.checkpoint_dir(full_dir), str(N_STEPS), "params")
    sizes = {os.path.join(r, f): os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(params_dir) for f in fs}
    for i, victim in enumerate(sorted(sizes, key=sizes.get, reverse=True)[:3]):
        run = tmp_path / f"copy{i}"
        shutil.copytree(full_dir, run)
        _flip_middle_byte(str(run) + victim[len(full_dir):])
        rel = os.path.relpath(victim, os.path.dirname(params_dir))
        with pytest.raises(checkpoint.CheckpointError, match=f"is corrupt: {rel} does not match its checksum"):
            checkpoint.load_params(str(run))
        warnings = []
        monkey = absl_logging.warning
        absl_logging.warning = lambda msg, *a: warnings.append(msg % a)
        try:
            manager = checkpoint.make_checkpoint_manager(checkpoint.checkpoint_dir(str(run)))
            state = checkpoint.restore_state(manager, toy.init_state(jax.random.key(11)))
            manager.close()
        finally:
            absl_logging.warning = monkey
        assert train.host_step(state) == 2 * CKPT_EVERY
        assert len(warnings) == 1 and f"{N_STEPS} is not usable ({rel} does not match its checksum)" in warnings[0]
    assert os.path.isfile(os.path.join(os.path.dirname(params_dir), "SHA256SUMS"))


def test_load_params_on_another_device_count(tmp_path):
    """A checkpoint written on a 4-device mesh (one leaf sharded, the rest replicated, as the
    pretraining state) loads in a 1-device process as host numpy arrays [R, ...]: no "Topology
    mismatch"."""
    assert jax.device_count() == 4  # conftest
    mesh = sharding.make_mesh()
    state = sharding.put_replicated(toy.init_state(jax.random.key(3)), mesh)
    wte = state.params["wte"]["embedding"]
    state = state._replace(params={**state.params, "wte": {
        "embedding": jax.device_put(wte, NamedSharding(mesh, P(None, None, sharding.DATA_AXIS)))}})
    manager = checkpoint.make_checkpoint_manager(checkpoint.checkpoint_dir(str(tmp_path)))
    checkpoint.save_state(manager, state)
    manager.close()
    np.savez(tmp_path / "expected.npz", *[np.asarray(x) for x in jax.tree.leaves(state.params)])
    script = (
        "import sys, jax, numpy as np\n"
        "from safety_mech import checkpoint\n"
        "assert jax.device_count() == 1, jax.devices()\n"
        "params = checkpoint.load_params(sys.argv[1])\n"
        "leaves = jax.tree.leaves(params)\n"
        "assert all(type(x) is np.ndarray for x in leaves), [type(x) for x in leaves]\n"
        "expected = np.load(sys.argv[1] + '/expected.npz')\n"
        "for i, x in enumerate(leaves):\n"
        "    np.testing.assert_array_equal(x, expected[f'arr_{i}'])\n"
        "print('ok', len(leaves))\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]
    # and in this 4-device process, as numpy too
    params = checkpoint.load_params(str(tmp_path))
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))

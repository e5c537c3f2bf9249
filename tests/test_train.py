"""Training step, loop and replicas (``safety_mech/train.py``); the LM loss the step optimises."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_toy as toy
from safety_mech import files, losses, replicas, train
from safety_mech import model as model_lib


@pytest.fixture(scope="module")
def step_fn():
    """One compiled step shared by the tests (each test brings its own state; R = 1 and R = 2
    compile once each)."""
    return toy.shared_step()


# ------------------------------------------------------------------ losses


def test_lm_loss_normalizations_match_numpy():
    params = model_lib.init_params(jax.random.key(3), toy.MODEL)
    batch = toy.sample_counting(jax.random.key(4), 0, batch_size=3)
    batch["loss_mask"] = batch["loss_mask"].at[1, 5:].set(False).at[2].set(False)  # uneven / empty
    logits = np.asarray(jax.jit(model_lib.apply, static_argnums=1)(params, toy.MODEL, batch["tokens"][:, :-1]),
                        np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tgt = np.asarray(batch["tokens"][:, 1:])
    ce = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    m = np.asarray(batch["loss_mask"][:, 1:], np.float64)
    sums, counts = (ce * m).sum(-1), m.sum(-1)
    expected = {"tokens": sums / np.maximum(counts, 1), "seq_len": sums / (toy.T - 1), "none": sums}
    all_losses = jax.jit(lambda p, b: {n: losses.lm_loss(p, None, b, losses.LossConfig(toy.MODEL, n))
                                       for n in expected})(params, batch)  # one compilation
    for norm, per_example in expected.items():
        loss, aux = all_losses[norm]
        np.testing.assert_allclose(loss, per_example.mean(), rtol=1e-5)
    acc = ((logits.argmax(-1) == tgt) * m).sum() / m.sum()
    np.testing.assert_allclose(aux["accuracy"], acc, rtol=1e-6)
    with pytest.raises(ValueError, match="normalize"):
        losses.LossConfig(toy.MODEL, "mean")


# ------------------------------------------------------------------ the step


# Recorded once from this exact setup (jax 0.10.2, CPU) with a state without replica axis; regenerate
# by printing the two values below if model.init_params, the optimizer or the toy sampler change on
# purpose. A one-replica state [1] must give them bit for bit (replicas.over_replicas runs R = 1
# unbatched).
GOLDEN_LOSS_STEP_2 = 3.9421415
GOLDEN_PARAM_SUM_STEP_2 = 32.520195


def test_golden_two_steps(step_fn):
    state = toy.init_state(jax.random.key(42))
    state, m1 = step_fn(state)
    state, m2 = step_fn(state)
    assert state.step.shape == (1,) and int(state.step[0]) == 2
    assert all(np.shape(v) == (1,) for v in m1.values()), {k: np.shape(v) for k, v in m1.items()}
    assert float(m1["train/lr"][0]) == pytest.approx(toy.LR / 2)
    loss = float(m2["train/loss"][0])
    param_sum = float(sum(jnp.sum(x) for x in jax.tree.leaves(state.params)))
    assert loss == pytest.approx(GOLDEN_LOSS_STEP_2, rel=1e-5), loss
    assert param_sum == pytest.approx(GOLDEN_PARAM_SUM_STEP_2, rel=1e-4, abs=1e-4), param_sum
    assert float(m1["train/grad_norm"][0]) > 0 and float(m1["train/update_norm"][0]) > 0


def test_loss_decreases(step_fn):
    state = toy.init_state(jax.random.key(0))
    losses_seen = []
    for _ in range(25):
        state, m = step_fn(state)
        losses_seen.append(float(m["train/loss"][0]))
    assert np.mean(losses_seen[-5:]) < np.mean(losses_seen[:5]) - 0.3, losses_seen


def test_replicas_by_vmap_equal_separate_runs(step_fn):
    lrs, seeds = (1e-2, 3e-3), (7,)
    stacked = toy.init_replicas(lrs, seeds)
    assert replicas.count(stacked) == 2
    np.testing.assert_allclose(stacked.opt_state.hyperparams["peak_lr"], lrs, rtol=1e-7)
    for _ in range(3):
        stacked, vm = step_fn(stacked)
    assert vm["train/loss"].shape == (2,)
    for r, lr in enumerate(lrs):
        state = toy.init_state(replicas.data_key(lrs, seeds, r), lr)  # the same replica trained alone
        for _ in range(3):
            state, m = step_fn(state)
        np.testing.assert_allclose(vm["train/loss"][r], m["train/loss"][0], rtol=1e-5)
        np.testing.assert_allclose(vm["train/lr"][r], m["train/lr"][0], rtol=1e-6)
        # vmap changes XLA's fusion / reduction order: equal to float tolerance, not bitwise
        replica = replicas.select(stacked.params, r)
        for a, b in zip(jax.tree.leaves(replica), jax.tree.leaves(replicas.select(state.params, 0)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(vm["train/loss"][0], vm["train/loss"][1])


def test_init_replicas_follow_the_grid():
    """Replica r of lrs × seeds starts from replicas.data_key(lrs, seeds, r) with its own peak lr:
    the same seed gives the same init at both learning rates only through that key."""
    lrs, seeds = (1e-2, 3e-3), (0, 5)
    stacked = toy.init_replicas(lrs, seeds)
    assert replicas.count(stacked) == 4 and stacked.step.tolist() == [0, 0, 0, 0]
    np.testing.assert_allclose(stacked.opt_state.hyperparams["peak_lr"], [1e-2, 1e-2, 3e-3, 3e-3], rtol=1e-7)
    for r in range(4):
        alone = toy.init_state(replicas.data_key(lrs, seeds, r), replicas.grid(lrs, seeds)[r][0])
        assert toy.tree_equal(replicas.select(stacked, r), replicas.select(alone, 0))
    wte = np.asarray(stacked.params["wte"]["embedding"])
    assert len({wte[r].tobytes() for r in range(4)}) == 4  # four different initialisations


# ------------------------------------------------------------------ the loop


def test_loop_writes_metrics_and_final_eval(step_fn, tmp_path):
    calls = []

    def eval_fn(params):
        calls.append(replicas.count(params))
        return {"eval/safe/gen_instruct": np.array([0.25])}  # [R] values, as metrics.make_instruct_eval's

    state, final = train.train(step_fn, toy.init_state(jax.random.key(1)), n_steps=6, workdir=str(tmp_path),
                               log_every=2, eval_every=3, eval_fn=eval_fn, tokens_per_step=toy.BATCH * toy.T)
    assert int(state.step[0]) == 6 and calls == [1, 1]  # step 3 and the final evaluation, on [1] params
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    assert records[1] == {"step": 3, "eval/safe/gen_instruct": [0.25]}
    last = records[-1]
    assert last["final"] and last["eval/safe/gen_instruct"] == [0.25]
    assert len(last["train/loss"]) == 1 and math.isfinite(last["train/loss"][0])
    assert last == {k: files.to_jsonable(v) for k, v in final.items()} and final["final"] is True
    for key in ("train/grad_norm", "train/param_norm", "train/update_norm", "train/lr", "time/tokens_per_s"):
        assert key in records[0] and key in last
    assert isinstance(records[0]["train/lr"], list) and isinstance(records[0]["time/tokens_per_s"], float)


def test_loop_waits_for_the_device_only_at_log_points(step_fn, monkeypatch):
    reads = []
    real_get = jax.device_get
    monkeypatch.setattr(train.jax, "device_get", lambda x: reads.append(1) or real_get(x))
    train.train(step_fn, toy.init_state(jax.random.key(1)), n_steps=8, log_every=4)
    assert len(reads) == 4  # the start's step counter; the first step (its time is the compilation); steps 4, 8


def test_loop_pauses_at_its_deadline_and_resumes_exactly(step_fn, tmp_path):
    """A deadline already passed: every call trains one step, saves and raises; the paused and
    resumed run ends where an uninterrupted run does, bit for bit."""
    whole, _ = train.train(step_fn, toy.init_state(jax.random.key(2)), n_steps=5)
    saved = {}
    state, calls = toy.init_state(jax.random.key(2)), 0
    while True:
        calls += 1
        try:
            state, final = train.train(step_fn, state, n_steps=5, workdir=str(tmp_path), log_every=2,
                                       save_fn=lambda s: saved.update(state=s), deadline=float("-inf"))
            break
        except train.TimeBudgetReached as e:
            assert str(e) == f"time budget reached at step {calls} of 5 (checkpoint saved)"
            state = saved["state"]
    assert calls == 5 and final["final"] and int(state.step[0]) == 5
    assert toy.tree_equal(state.params, whole.params)
    steps_logged = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [2, 4, 5]


def test_non_finite_loss_names_the_step(step_fn, tmp_path):
    def poisoned_step(state, ref=None):
        if train.host_step(state) == 3:  # the 4th update sees NaN weights, so a NaN loss
            state = state._replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
        return step_fn(state, ref)

    with pytest.raises(train.NonFiniteLossError, match=r"at step 4$"):
        train.train(poisoned_step, toy.init_state(jax.random.key(0)), n_steps=8, workdir=str(tmp_path),
                    log_every=1)
    steps_logged = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3]


def test_non_finite_loss_of_one_replica_names_it(step_fn, tmp_path):
    def poisoned_step(state, ref=None):
        if train.host_step(state) == 1:  # replica 1 only
            nan_1 = lambda x: x.at[1].multiply(jnp.nan)  # noqa: E731
            state = state._replace(params=jax.tree.map(nan_1, state.params))
        return step_fn(state, ref)

    with pytest.raises(train.NonFiniteLossError, match=r"at step 2 \(replicas \[1\]\)"):
        train.train(poisoned_step, toy.init_replicas((1e-2, 3e-3), (0,)), n_steps=4, workdir=str(tmp_path),
                    log_every=1)

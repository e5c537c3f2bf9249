"""Data parallelism over 4 fake CPU devices (tests/conftest.py) equals one device: the training step
(one and two replicas) and a chunked evaluation give the same numbers, the sampled batch is split
over 'data' and the state stays replicated."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import train_toy as toy
from safety_mech import losses, metrics, replicas, sharding


def _recording_loss(seen):
    """lm_loss that records the sharding the compiler gives the batch it is called on."""
    def loss_fn(params, ref_params, batch, cfg):
        jax.debug.inspect_array_sharding(batch["tokens"], callback=seen.append)
        return losses.lm_loss(params, ref_params, batch, cfg)

    return loss_fn


def _trajectory(step_fn, state, mesh, n_steps=4):
    """Losses [n_steps, R] of ``n_steps`` steps from ``state`` and the final state."""
    state = sharding.put_replicated(state, mesh)
    out = []
    for _ in range(n_steps):
        state, m = step_fn(state)
        out.append(np.asarray(m["train/loss"]))
    return np.stack(out), state


def _assert_close_and_replicated(losses4, state4, losses1, state1):
    np.testing.assert_allclose(losses4, losses1, rtol=1e-5)
    # the gradient all-reduce sums in another order; Adam magnifies that on near-zero entries
    for a, b in zip(jax.tree.leaves(state4.params), jax.tree.leaves(state1.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for leaf in jax.tree.leaves(state4):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4


@pytest.mark.parametrize("n_replicas", [1, 2])
def test_train_step_on_four_devices_matches_one(n_replicas):
    assert jax.device_count() == 4, "conftest must force 4 host devices before jax is imported"
    mesh4 = sharding.make_mesh()
    assert mesh4.shape == {"data": 4} and sharding.make_mesh(jax.devices()[:1]).shape == {"data": 1}
    init = (lambda: toy.init_state(jax.random.key(3))) if n_replicas == 1 else \
        (lambda: toy.init_replicas((1e-2, 3e-3), (3,)))
    seen = []
    step4 = toy.make_step(mesh=mesh4, loss_fn=_recording_loss(seen))
    losses4, state4 = _trajectory(step4, init(), mesh4)
    losses1, state1 = _trajectory(toy.shared_step(), init(), None)
    assert losses4.shape == (4, n_replicas)
    _assert_close_and_replicated(losses4, state4, losses1, state1)
    assert n_replicas == 1 or not np.allclose(losses4[:, 0], losses4[:, 1])
    # the batch sampled inside the step is split over 'data' along its example axis (under the
    # replica vmap: the per-replica example axis)
    assert len(seen) == 1, seen
    assert seen[0].mesh.shape == {"data": 4}
    want = P(sharding.DATA_AXIS) if n_replicas == 1 else P(None, sharding.DATA_AXIS)
    assert seen[0].spec == want, seen[0].spec


def test_chunked_evaluation_on_four_devices_matches_one():
    """metrics.make_chunk_fn (what the evaluation and the attack run): replica-stacked params, the
    examples split over the 4 devices when their number divides by 4, whole otherwise."""
    mesh = sharding.make_mesh()
    params = toy.init_replicas((1e-2, 3e-3), (0, 1)).params  # R = 4 different models
    seen = []

    def fn(p, ev):
        jax.debug.inspect_array_sharding(ev["tokens"], callback=seen.append)
        return losses.token_cross_entropy(p, toy.MODEL, ev["tokens"])[0].sum(-1)

    on4, on1 = metrics.make_chunk_fn(fn, mesh=mesh), metrics.make_chunk_fn(fn)
    for n, split in ((8, True), (6, False)):
        ev = {"tokens": toy.sample_counting(jax.random.key(n), 0, batch_size=n)["tokens"]}
        got1 = np.asarray(on1(params, ev))
        seen.clear()
        got4 = np.asarray(on4(sharding.put_replicated(params, mesh), ev))
        assert got4.shape == (4, n)
        np.testing.assert_allclose(got4, got1, rtol=1e-5)
        for r in range(4):  # the replica axis is really four models
            alone = losses.token_cross_entropy(replicas.select(params, r), toy.MODEL, ev["tokens"])[0].sum(-1)
            np.testing.assert_allclose(got1[r], alone, rtol=1e-5)
        # the examples are shared by the replicas (no replica axis): split on their own axis
        assert len(seen) == 1 and seen[0].mesh.shape == {"data": 4}, seen
        assert seen[0].spec == (P(sharding.DATA_AXIS) if split else P()), (n, seen)


def test_batch_size_must_split_over_devices():
    sharding.check_batch_size(8, sharding.make_mesh())
    with pytest.raises(ValueError, match="not divisible"):
        sharding.check_batch_size(6, sharding.make_mesh())


def test_distributed_init_is_opt_in(monkeypatch):
    """Single-host runs never wait for a coordinator: jax.distributed.initialize is called only
    when asked, with the given arguments."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    sharding.maybe_initialize_distributed(False)
    assert calls == []
    sharding.maybe_initialize_distributed(True, coordinator_address="host:1234", num_processes=2, process_id=0)
    assert calls == [dict(coordinator_address="host:1234", num_processes=2, process_id=0)]

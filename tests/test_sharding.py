"""Data parallelism over 4 fake CPU devices (tests/conftest.py) equals one device."""
import jax
import numpy as np
import pytest

import train_toy as toy
from safety_mech import sharding


def _trajectory(mesh, n_steps=4, n_replicas=1):
    """Losses of ``n_steps`` steps and the final state; ``mesh=None``: plain single-device jit."""
    step_fn = toy.shared_step(n_replicas, mesh)
    key = jax.random.key(3)
    state = toy.init_state(key) if n_replicas == 1 else toy.init_replicas(key, (1e-2, 3e-3))
    state = sharding.put_replicated(state, mesh)
    losses = []
    for _ in range(n_steps):
        state, m = step_fn(state)
        losses.append(np.asarray(m["train/loss"]))
    return np.stack(losses), state


def test_four_devices_match_one():
    assert jax.device_count() == 4, "conftest must force 4 host devices before jax is imported"
    mesh4 = sharding.make_mesh()
    assert mesh4.shape == {"data": 4} and sharding.make_mesh(jax.devices()[:1]).shape == {"data": 1}
    losses1, state1 = _trajectory(None)
    losses4, state4 = _trajectory(mesh4)
    np.testing.assert_allclose(losses4, losses1, rtol=1e-5)
    # the gradient all-reduce sums in another order; Adam magnifies that on near-zero entries
    for a, b in zip(jax.tree.leaves(state4.params), jax.tree.leaves(state1.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    leaf = jax.tree.leaves(state4.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4


def test_replicas_with_a_mesh_lower():
    """vmap over replicas composes with the batch sharding constraint (lowering only: a second
    4-device compile would double this file's time; the numerics of vmap are tested in test_train)."""
    mesh = sharding.make_mesh()
    state = sharding.put_replicated(toy.init_replicas(jax.random.key(3), (1e-2, 3e-3)), mesh)
    text = toy.make_step(mesh=mesh, n_replicas=2).lower(state).as_text()
    assert "sharding" in text


def test_batch_size_must_split_over_devices():
    sharding.check_batch_size(8, sharding.make_mesh())
    with pytest.raises(ValueError, match="not divisible"):
        sharding.check_batch_size(6, sharding.make_mesh())


def test_distributed_init_is_opt_in():
    sharding.maybe_initialize_distributed(False)  # must not block waiting for a coordinator

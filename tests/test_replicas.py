"""safety_mech/replicas.py: the replica grid and names, per-replica keys, select / stack, and
over_replicas (R = 1 unbatched, bit for bit; R = 2 equal to two separate calls)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_mech import replicas


def test_grid_names_and_keys():
    lrs, seeds = (1e-3, 1e-4), (0, 1)
    assert replicas.grid(lrs, seeds) == [(1e-3, 0), (1e-3, 1), (1e-4, 0), (1e-4, 1)]  # lrs outer
    assert replicas.names("ssft", lrs, seeds) == ["ssft/lr=0.001/seed=0", "ssft/lr=0.001/seed=1",
                                                 "ssft/lr=0.0001/seed=0", "ssft/lr=0.0001/seed=1"]
    assert replicas.names("dpo", [3e-5], [7]) == ["dpo/lr=3e-05/seed=7"]
    keys = [jax.random.key_data(replicas.data_key(lrs, seeds, r)) for r in range(4)]
    want = [jax.random.key_data(jax.random.fold_in(jax.random.key(s), i)) for i in range(2) for s in seeds]
    for got, expected in zip(keys, want, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert len({np.asarray(k).tobytes() for k in keys}) == 4
    # a replica's key depends on its seed and the index of its lr, not on the other seeds
    np.testing.assert_array_equal(jax.random.key_data(replicas.data_key(lrs, (1,), 1)), keys[3])


def test_select_stack_count():
    trees = [{"a": np.full((2,), r, np.float32), "b": {"c": np.full((3, 1), 10 * r)}} for r in range(3)]
    stacked = replicas.stack(trees)
    assert replicas.count(stacked) == 3
    assert stacked["a"].shape == (3, 2) and stacked["b"]["c"].shape == (3, 3, 1)
    for r, tree in enumerate(trees):
        got = replicas.select(stacked, r)
        np.testing.assert_array_equal(got["a"], tree["a"])
        np.testing.assert_array_equal(got["b"]["c"], tree["b"]["c"])


def _fn(params, x):
    """Rounding-sensitive (a matmul, a reduction, a nonlinearity): vmap would compile other kernels."""
    h = jnp.tanh(x @ params["w"] + params["b"])
    return {"y": (h * h).sum(-1) / 3.0, "h": h}


def _params(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(scale * rng.standard_normal((16, 32)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(32), jnp.float32)}


def _x(seed=9):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((8, 16)), jnp.float32)


def test_one_replica_equals_the_unbatched_call_bit_for_bit():
    params, x = _params(0), _x()
    want = jax.jit(_fn)(params, x)
    calls = []

    def spy(p, x):
        calls.append(p["w"].shape)  # traced once: the shapes fn sees
        return _fn(p, x)

    got = jax.jit(replicas.over_replicas(spy, in_axes=(0, None)))(replicas.stack([params]), x)
    assert calls == [(16, 32)]  # the replica axis squeezed away, not vmapped
    assert got["y"].shape == (1, 8) and got["h"].shape == (1, 8, 32)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k][0]).view(np.uint32), np.asarray(want[k]).view(np.uint32))


def test_two_replicas_equal_two_separate_calls():
    p0, p1, x = _params(0), _params(1, scale=0.3), _x()
    got = jax.jit(replicas.over_replicas(_fn, in_axes=(0, None)))(replicas.stack([p0, p1]), x)
    assert got["y"].shape == (2, 8)
    for r, p in enumerate((p0, p1)):
        want = jax.jit(_fn)(p, x)
        for k in want:
            np.testing.assert_allclose(got[k][r], want[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got["y"][0], got["y"][1])
    # every argument mapped (in_axes=0), and positional arguments mapped by their own axis
    xs = jnp.stack([x, 2 * x])
    both = jax.jit(replicas.over_replicas(_fn))(replicas.stack([p0, p1]), xs)
    np.testing.assert_allclose(both["y"][1], jax.jit(_fn)(p1, 2 * x)["y"], rtol=1e-5, atol=1e-6)
    one = jax.jit(replicas.over_replicas(_fn))(replicas.stack([p1]), xs[1:])
    np.testing.assert_array_equal(one["y"][0], jax.jit(_fn)(p1, 2 * x)["y"])


def test_shared_arguments_are_not_mapped():
    """in_axes None: the argument is passed whole to every replica (here a per-example vector whose
    leading axis is not a replica axis)."""
    p0, p1 = _params(0), _params(1)
    x = _x()
    with pytest.raises(ValueError):  # mapped by mistake: 8 examples are not 2 replicas
        replicas.over_replicas(_fn)(replicas.stack([p0, p1]), x)
    out = replicas.over_replicas(_fn, in_axes=(0, None))(replicas.stack([p0, p1]), x)
    assert out["h"].shape == (2, 8, 32)

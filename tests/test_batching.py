"""safety_mech/batching.py: chunked mapping with one compiled shape for any number of examples;
the filler rows of the last chunk never reach the output."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_mech import batching


@pytest.mark.parametrize("n,chunk", [(1, 4), (4, 4), (7, 3), (9, 4), (10, 5), (5, 8)])
def test_map_chunks_any_n(n, chunk):
    rows = 12
    inputs = {"x": np.arange(rows * 2, dtype=np.float32).reshape(rows, 2), "i": np.arange(rows, dtype=np.int32)}
    shapes = []

    def fn(part, scale):
        shapes.append(part["x"].shape)
        return {"y": scale * part["x"].sum(-1) + part["i"], "first": part["x"][:, :1]}

    out = batching.map_chunks(fn, inputs, n, chunk, 10.0)
    want_y = 10.0 * inputs["x"][:n].sum(-1) + np.arange(n)
    np.testing.assert_array_equal(out["y"], want_y)
    np.testing.assert_array_equal(out["first"], inputs["x"][:n, :1])
    assert isinstance(out["y"], np.ndarray) and out["y"].shape == (n,)
    c = min(chunk, n)
    assert shapes == [(c, 2)] * -(-n // c)  # every call has the chunk's shape


def test_padding_rows_are_dropped_and_wrap_around():
    """The last chunk is filled with the set's first examples (rows wrap around); their results are
    cut off, also with the example axis of the outputs elsewhere than 0."""
    inputs = np.arange(5, dtype=np.int32)
    seen = []

    def fn(part):
        seen.append(np.asarray(part).tolist())
        return jnp.stack([part, -part])  # examples on axis 1

    out = batching.map_chunks(fn, inputs, 5, 3, out_axis=1)
    assert seen == [[0, 1, 2], [3, 4, 0]]  # the filler is example 0 again
    np.testing.assert_array_equal(out, [[0, 1, 2, 3, 4], [0, -1, -2, -3, -4]])
    # fewer examples than rows: the results of the first n only
    out = batching.map_chunks(fn, inputs, 4, 3, out_axis=1)
    np.testing.assert_array_equal(out, [[0, 1, 2, 3], [0, -1, -2, -3]])


def test_jitted_fn_compiles_once():
    traces = []

    @jax.jit
    def fn(part):
        traces.append(1)
        return part * 2

    x = np.arange(11.0)
    np.testing.assert_array_equal(batching.map_chunks(fn, x, 11, 4), 2 * x)
    assert len(traces) == 1


def test_map_arrays():
    a = np.arange(14.0).reshape(7, 2)
    b = np.arange(7)
    calls = []

    def fn(x, y):
        calls.append(x.shape[0])
        return (x.sum(-1) + y)[None]  # examples on axis 1

    out = batching.map_arrays(fn, [a, b], 3, out_axis=1)
    np.testing.assert_array_equal(out, (a.sum(-1) + b)[None])
    assert calls == [3, 3, 3]  # last chunk padded to the same shape


def test_no_examples_is_an_error():
    with pytest.raises(ValueError, match="n >= 1"):
        batching.map_chunks(lambda p: p, np.zeros((3, 1)), 0, 2)
    with pytest.raises(ValueError, match="n >= 1"):
        batching.map_chunks(lambda p: p, np.zeros((0, 1)), 2, 2)

"""Sequence packing (safety_mech/packing.py): the plan, the model on packed rows, the packed loss and
the packed training step equal their unpacked counterparts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_toy as toy
from safety_mech import grammar as gr
from safety_mech import losses, optim, packing, sharding
from safety_mech import model as model_lib


def sample_ragged(key, step, batch_size=toy.BATCH):
    """The toy counting sequences cut at a random length (PAD after it, no targets there): lengths
    from 0 targets (an empty example) to the full row, so that rows can be shared."""
    del step
    batch = toy.sample_counting(key, 0, batch_size)
    n_B = jax.random.randint(jax.random.fold_in(key, 1), (batch_size,), 1, toy.T + 1)  # tokens kept
    keep_BxT = jnp.arange(toy.T) < n_B[:, None]
    return {"tokens": jnp.where(keep_BxT, batch["tokens"], gr.PAD).astype(jnp.int32),
            "loss_mask": batch["loss_mask"] & keep_BxT}


def _check_plan(lengths, row_len):
    row, offset, n_rows = packing.plan_rows(lengths, row_len)
    used = np.zeros((n_rows, row_len), int)
    for r, o, n in zip(row, offset, lengths):
        assert 0 <= r < n_rows and 0 <= o and o + n <= row_len
        used[r, o:o + n] += 1
    assert used.max() <= 1, "two examples share a slot"
    return row, offset, n_rows


def test_plan_is_first_fit_decreasing_without_overlap():
    row, offset, n_rows = _check_plan([10, 6, 5, 5, 4, 0], 15)
    # longest first: 10 -> row 0; 6 -> row 1; 5 -> row 0 (fills it); 5 -> row 1; 4 -> row 1 (fills it)
    assert n_rows == 2 and list(row[:5]) == [0, 1, 0, 1, 1] and list(offset[:5]) == [0, 0, 10, 6, 11]
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(0, 115, size=64)
        _, _, n_rows = _check_plan(lengths, 114)
        assert -(-lengths.sum() // 114) <= n_rows <= 64
    assert _check_plan([114] * 3, 114)[2] == 3
    with pytest.raises(ValueError, match="lengths"):
        packing.plan_rows([5, 20], 15)
    assert [packing.bucket(n, 64) for n in (1, 4, 5, 38, 63, 64)] == [4, 4, 8, 40, 64, 64]
    assert packing.bucket(7, 6) == 6


@pytest.mark.parametrize("block,pos", [("paper", "sinusoidal"), ("prenorm", "learned")])
def test_model_on_a_packed_row_equals_each_sequence_alone(block, pos):
    cfg = model_lib.ModelConfig(vocab_size=gr.VOCAB_SIZE, seq_len=16, n_layer=2, n_head=2, d_model=16,
                                d_mlp=32, block=block, pos=pos)
    params = model_lib.init_params(jax.random.key(0), cfg)
    a = jax.random.randint(jax.random.key(1), (1, 7), 0, gr.VOCAB_SIZE)
    b = jax.random.randint(jax.random.key(2), (1, 9), 0, gr.VOCAB_SIZE)
    row = jnp.concatenate([a, b], axis=1)
    positions = jnp.concatenate([jnp.arange(7), jnp.arange(9)])[None]
    segments = jnp.asarray([[0] * 7 + [1] * 9])
    apply = jax.jit(lambda t, **kw: model_lib.apply(params, cfg, t, **kw))
    packed = apply(row, positions=positions, segment_ids=segments)
    alone_b = apply(b)
    np.testing.assert_allclose(packed[:, :7], apply(a), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(packed[:, 7:], alone_b, rtol=1e-5, atol=1e-6)
    # without the segments the second sequence would see the first: the mask matters
    mixed = apply(row, positions=positions)
    assert np.abs(mixed[:, 7:] - alone_b).max() > 100 * np.abs(packed[:, 7:] - alone_b).max() + 1e-5


def test_packed_loss_and_gradients_equal_lm_loss():
    params = model_lib.init_params(jax.random.key(3), toy.MODEL)
    batch = sample_ragged(jax.random.key(4), 0, batch_size=12)
    batch["loss_mask"] = batch["loss_mask"].at[0].set(False)  # an example without targets
    lengths = np.asarray(packing.needed_lengths(batch["loss_mask"]))
    row, offset, n_rows = packing.plan_rows(lengths, toy.T - 1)
    assert n_rows < 12, "the ragged batch should share rows"

    @jax.jit  # every normalisation, unpacked and packed, in one compilation
    def both(params, batch, row, offset):
        out = {}
        for norm in losses.NORMALIZATIONS:
            cfg = losses.LossConfig(toy.MODEL, norm)
            packed = packing.pack(batch, row, offset, n_rows, norm)
            out[norm] = (jax.value_and_grad(losses.lm_loss, has_aux=True)(params, None, batch, cfg),
                         jax.value_and_grad(losses.packed_lm_loss, has_aux=True)(params, None, packed, cfg),
                         packed["inputs"].shape)
        return out

    for norm, (((want, want_aux), want_g), ((got, got_aux), got_g), shape) in both(
            params, batch, jnp.asarray(row), jnp.asarray(offset)).items():
        assert shape == (n_rows, toy.T - 1)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=norm)
        for k in want_aux:
            np.testing.assert_allclose(got_aux[k], want_aux[k], rtol=1e-5, err_msg=k)
        for g1, g2 in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
            np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-6, err_msg=norm)


def _run(step_fn, state, n=2):
    out = []
    for _ in range(n):
        state, m = step_fn(state)
        out.append(m)
    return state, out


@pytest.mark.parametrize("n_replicas", [1, 2])
def test_packed_step_equals_unpacked_step(n_replicas):
    lrs = (1e-2, 3e-3)[:n_replicas]
    init = (lambda: toy.init_state(jax.random.key(5))) if n_replicas == 1 else (lambda: toy.init_replicas(lrs, (5,)))
    lr_fn = optim.make_lr_fn(toy.OPT)
    plain = toy.make_step(sample_fn=sample_ragged)
    packed = packing.make_packed_train_step(toy.OPTIMIZER, sample_ragged, toy.LOSS, lr_fn=lr_fn, row_multiple=1,
                                            chunk=1)  # one batch per plan: its own row count
    s1, m1 = _run(plain, init())
    s2, m2 = _run(packed, init())
    for a, b in zip(m1, m2):
        assert np.shape(b["train/loss"]) == (n_replicas,)
        np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-5)
        np.testing.assert_allclose(b["train/accuracy"], a["train/accuracy"], rtol=1e-5)
        np.testing.assert_allclose(b["train/lr"], a["train/lr"], rtol=1e-6)
        assert np.all(np.asarray(b["train/packed_rows"]) < toy.BATCH)  # 8 ragged examples share rows
    # summation order differs (rows, vmap); Adam magnifies that on near-zero entries
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert np.asarray(s2.step).tolist() == [2] * n_replicas
    with pytest.raises(ValueError, match="reference"):
        packed(s2, s2.params)


def test_plan_many_is_plan_rows_of_each_batch():
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 40, size=(7, 33))
    row, offset, n_rows = packing.plan_many(lengths, 40)
    for m in range(7):
        r, o, n = _check_plan(lengths[m], 40)
        assert (row[m] == r).all() and (offset[m] == o).all() and n_rows[m] == n


def test_packed_steps_in_chunks_resume_exactly_and_do_not_wait_for_the_device(monkeypatch):
    """Chunks of 3 steps over 7 steps: the same losses and row counts as one step per plan, the host reads
    lengths from the device once per chunk, and a step function started from the
    state after step 4 (mid-chunk, as after a resume) continues bit-identically."""
    make = lambda: packing.make_packed_train_step(toy.OPTIMIZER, sample_ragged, toy.LOSS, chunk=3)  # noqa: E731
    reads = []
    real_get = jax.device_get
    monkeypatch.setattr(packing.jax, "device_get", lambda x: reads.append(1) or real_get(x))
    state, metrics = _run(make(), toy.init_state(jax.random.key(7)), n=7)
    assert len(reads) == 4  # the start's step counter, then the chunks of steps 1-3, 4-6, 7-9
    monkeypatch.setattr(packing.jax, "device_get", real_get)
    one_plan = packing.make_packed_train_step(toy.OPTIMIZER, sample_ragged, toy.LOSS, chunk=1)
    _, single = _run(one_plan, toy.init_state(jax.random.key(7)), n=7)
    for a, b in zip(single, metrics):
        np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-5)
        np.testing.assert_array_equal(b["train/packed_rows"], a["train/packed_rows"])  # each step its own plan
    assert len({int(m["train/packed_rows"][0]) for m in single}) > 1  # rows vary between steps
    s4, _ = _run(make(), toy.init_state(jax.random.key(7)), n=4)
    s7, resumed = _run(make(), s4, n=3)
    for a, b in zip(metrics[4:], resumed):
        np.testing.assert_array_equal(b["train/loss"], a["train/loss"])
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(s7.params), strict=True):
        np.testing.assert_array_equal(b, a)


def test_packed_step_on_four_devices_matches_one():
    mesh = sharding.make_mesh()
    assert mesh.shape == {"data": 4}
    step4 = packing.make_packed_train_step(toy.OPTIMIZER, sample_ragged, toy.LOSS, mesh=mesh)
    step1 = packing.make_packed_train_step(toy.OPTIMIZER, sample_ragged, toy.LOSS)
    s4, m4 = _run(step4, sharding.put_replicated(toy.init_state(jax.random.key(6)), mesh))
    s1, m1 = _run(step1, toy.init_state(jax.random.key(6)))
    for a, b in zip(m1, m4):
        np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-5)
        assert int(b["train/packed_rows"][0]) % 4 == 0
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)

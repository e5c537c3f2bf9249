"""Training step, optimizer, loop, replicas; the evaluation pieces the loop uses (greedy decoding)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_toy as toy
from safety_mech import evaluate, losses, train
from safety_mech import model as model_lib


@pytest.fixture(scope="module")
def step_fn():
    """One compiled single-replica step shared by the tests (each test brings its own state)."""
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


# ------------------------------------------------------------------ optimizer


def test_lr_schedule_warmup_cosine_constant():
    cfg = train.OptConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, decay_end_step=30)
    lr = lambda s: float(train.lr_schedule(s, cfg.lr, cfg))  # noqa: E731
    assert lr(0) == pytest.approx(1e-4)
    assert lr(9) == pytest.approx(1e-3)
    assert lr(10) == pytest.approx(1e-3)
    assert lr(20) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-5)
    assert lr(30) == pytest.approx(1e-5)
    assert lr(1000) == pytest.approx(1e-5)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 40))


def test_weight_decay_only_on_dense_kernels():
    cfg = toy.MODEL.__class__(**{**toy.MODEL.__dict__, "pos": "learned", "block": "prenorm"})
    params = model_lib.init_params(jax.random.key(0), cfg)
    mask = train.weight_decay_mask(params)
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert {k for k, v in flat.items() if v} == {
        "h_0/attn/c_attn/kernel", "h_0/attn/c_proj/kernel", "h_0/mlp/c_fc/kernel", "h_0/mlp/c_proj/kernel",
        "lm_head/kernel"}
    assert not flat["wte/embedding"] and not flat["wpe/embedding"] and not flat["h_0/ln_2/scale"]
    # With zero gradients the update is pure decay: -lr(0) * wd * p on kernels, 0 elsewhere.
    opt_cfg = train.OptConfig(lr=0.5, warmup_steps=0, decay_end_step=10, weight_decay=0.1)
    tx = train.make_optimizer(opt_cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, jax.jit(tx.init)(params), params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        p = params
        for k in path:
            p = p[k.key]
        expected = -0.5 * 0.1 * p if path[-1].key == "kernel" else jnp.zeros_like(p)
        np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-9)


def test_gradient_clipping_bounds_the_adam_input():
    """clip_by_global_norm runs before Adam: a huge gradient is scaled to norm 1 first."""
    opt_cfg = train.OptConfig(lr=1.0, warmup_steps=0, decay_end_step=10, weight_decay=0.0, b1=0.0,
                              b2=0.0, eps=1e-30)
    tx = train.make_optimizer(opt_cfg)
    params = {"w": {"kernel": jnp.ones(4)}}
    grads = {"w": {"kernel": jnp.array([300.0, 400.0, 0.0, 0.0])}}
    state = tx.init(params)
    clipped = tx.update(grads, state, params)[1].inner_state[1].mu  # Adam's first moment = clipped grad
    np.testing.assert_allclose(clipped["w"]["kernel"], [0.6, 0.8, 0.0, 0.0], rtol=1e-6)


# ------------------------------------------------------------------ the step


# Recorded once from this exact setup (jax 0.10.2, CPU); regenerate by printing the two values below
# if model.init_params, the optimizer or the toy sampler change on purpose.
GOLDEN_LOSS_STEP_2 = 3.9421415
GOLDEN_PARAM_SUM_STEP_2 = 32.520195


def test_golden_two_steps(step_fn):
    state = toy.init_state(jax.random.key(42))
    state, m1 = step_fn(state)
    state, m2 = step_fn(state)
    assert int(state.step) == 2
    assert float(m1["train/lr"]) == pytest.approx(toy.OPT.lr / 2)
    loss = float(m2["train/loss"])
    param_sum = float(sum(jnp.sum(x) for x in jax.tree.leaves(state.params)))
    assert loss == pytest.approx(GOLDEN_LOSS_STEP_2, rel=1e-5), loss
    assert param_sum == pytest.approx(GOLDEN_PARAM_SUM_STEP_2, rel=1e-4, abs=1e-4), param_sum
    assert float(m1["train/grad_norm"]) > 0 and float(m1["train/update_norm"]) > 0


def test_loss_decreases(step_fn):
    state = toy.init_state(jax.random.key(0))
    losses_seen = []
    for _ in range(25):
        state, m = step_fn(state)
        losses_seen.append(float(m["train/loss"]))
    assert np.mean(losses_seen[-5:]) < np.mean(losses_seen[:5]) - 0.3, losses_seen


def test_replicas_by_vmap_equal_separate_runs(step_fn):
    key, lrs = jax.random.key(7), (1e-2, 3e-3)
    stacked = toy.init_replicas(key, lrs)
    vstep = toy.shared_step(n_replicas=2)
    for _ in range(3):
        stacked, vm = vstep(stacked)
    for r, lr in enumerate(lrs):
        state = toy.init_state(train.replica_key(key, r), lr)
        for _ in range(3):
            state, m = step_fn(state)
        np.testing.assert_allclose(vm["train/loss"][r], m["train/loss"], rtol=1e-5)
        np.testing.assert_allclose(vm["train/lr"][r], m["train/lr"], rtol=1e-6)
        # vmap changes XLA's fusion / reduction order: equal to float tolerance, not bitwise
        replica = train.select_replica(stacked.params, r)
        for a, b in zip(jax.tree.leaves(replica), jax.tree.leaves(state.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(vm["train/loss"][0], vm["train/loss"][1])


# ------------------------------------------------------------------ the loop


def test_loop_writes_metrics_and_final_eval(step_fn, tmp_path):
    calls = []

    def eval_fn(params):
        calls.append(1)
        return {"eval/safe/gen_instruct": 0.25}

    state, final = train.train(step_fn, toy.init_state(jax.random.key(1)), n_steps=6, workdir=str(tmp_path),
                               log_every=2, eval_every=3, eval_fn=eval_fn, tokens_per_step=toy.BATCH * toy.T)
    assert int(state.step) == 6 and len(calls) == 2  # step 3 and the final evaluation
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    assert "eval/safe/gen_instruct" in records[1] and "train/loss" not in records[1]
    last = records[-1]
    assert last["final"] and last["eval/safe/gen_instruct"] == 0.25 and math.isfinite(last["train/loss"])
    assert last == final | {"final": True}
    for key in ("train/grad_norm", "train/param_norm", "train/update_norm", "train/lr", "time/tokens_per_s"):
        assert key in records[0] and key in last


def test_non_finite_loss_names_the_step(step_fn, tmp_path):
    def poisoned_step(state, ref=None):
        if train.host_step(state) == 3:  # the 4th update sees NaN weights, so a NaN loss
            state = state._replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
        return step_fn(state, ref)

    with pytest.raises(train.NonFiniteLossError, match=r"at step 4\b"):
        train.train(poisoned_step, toy.init_state(jax.random.key(0)), n_steps=8, workdir=str(tmp_path),
                    log_every=1)
    steps_logged = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3]


# ------------------------------------------------------------------ greedy decoding


def _naive_greedy(params, cfg, prompt, prompt_len):
    """One token at a time on the host (the model is causal, so the array tail does not matter)."""
    apply = jax.jit(lambda p, x: model_lib.apply(p, cfg, x))
    out = np.array(prompt)
    for pos in range(int(prompt_len.min()), out.shape[1]):
        logits = np.asarray(apply(params, jnp.asarray(out)))
        for b in range(out.shape[0]):
            if pos >= prompt_len[b]:
                out[b, pos] = logits[b, pos - 1].argmax()
    return out


def test_greedy_decode_matches_token_by_token_loop():
    params = model_lib.init_params(jax.random.key(5), toy.MODEL)
    batch = toy.sample_counting(jax.random.key(6), 0, batch_size=3)
    prompt_len = jnp.array([4, 9, 15])
    prompt = jnp.where(jnp.arange(toy.T) < prompt_len[:, None], batch["tokens"], 20)
    decoded = evaluate.make_greedy_decoder(toy.MODEL)(params, prompt, prompt_len)
    np.testing.assert_array_equal(decoded, _naive_greedy(params, toy.MODEL, prompt, prompt_len))
    limited = evaluate.greedy_decode(params, toy.MODEL, prompt, prompt_len, max_new=2)
    np.testing.assert_array_equal(limited[0, :6], decoded[0, :6])
    assert (limited[0, 6:] == 20).all()


def test_gen_exact_match_only_checks_governed_positions():
    target = jnp.array([[1, 2, 3, 4], [1, 2, 3, 4]])
    decoded = jnp.array([[1, 2, 3, 9], [1, 9, 3, 4]])
    gov = jnp.array([[False, True, True, False]] * 2)
    np.testing.assert_array_equal(evaluate.gen_exact_match(decoded, target, gov), [True, False])

"""The optimizer of SPEC §5 (``safety_mech/optim.py``): the learning-rate schedule, weight decay on
dense kernels only, clipping before Adam, the per-replica peak learning rate, the config's checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_toy as toy
from safety_mech import model as model_lib
from safety_mech import optim, train


def test_lr_schedule_warmup_cosine_constant():
    cfg = optim.OptConfig(lrs=(1e-3,), min_lr=1e-5, warmup_steps=10, decay_end_step=30)
    lr = lambda s: float(optim.lr_schedule(s, cfg.lrs[0], cfg))  # noqa: E731
    assert lr(0) == pytest.approx(1e-4)
    assert lr(9) == pytest.approx(1e-3)
    assert lr(10) == pytest.approx(1e-3)
    assert lr(20) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-5)
    assert lr(30) == pytest.approx(1e-5)
    assert lr(1000) == pytest.approx(1e-5)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 40))
    # a replica whose peak is below min_lr stays at its peak after the warmup (never above it)
    assert float(optim.lr_schedule(1000, 1e-6, cfg)) == pytest.approx(1e-6)


def test_weight_decay_only_on_dense_kernels():
    cfg = toy.MODEL.__class__(**{**toy.MODEL.__dict__, "pos": "learned", "block": "prenorm"})
    params = model_lib.init_params(jax.random.key(0), cfg)
    mask = optim.weight_decay_mask(params)
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert {k for k, v in flat.items() if v} == {
        "h_0/attn/c_attn/kernel", "h_0/attn/c_proj/kernel", "h_0/mlp/c_fc/kernel", "h_0/mlp/c_proj/kernel",
        "lm_head/kernel"}
    assert not flat["wte/embedding"] and not flat["wpe/embedding"] and not flat["h_0/ln_2/scale"]
    # With zero gradients the update is pure decay: -lr(0) * wd * p on kernels, 0 elsewhere.
    opt_cfg = optim.OptConfig(lrs=(0.5,), warmup_steps=0, decay_end_step=10, weight_decay=0.1)
    tx = optim.make_optimizer(opt_cfg)
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
    opt_cfg = optim.OptConfig(lrs=(1.0,), warmup_steps=0, decay_end_step=10, weight_decay=0.0, b1=0.0,
                              b2=0.0, eps=1e-30)
    tx = optim.make_optimizer(opt_cfg)
    params = {"w": {"kernel": jnp.ones(4)}}
    grads = {"w": {"kernel": jnp.array([300.0, 400.0, 0.0, 0.0])}}
    state = tx.init(params)
    clipped = tx.update(grads, state, params)[1].inner_state[1].mu  # Adam's first moment = clipped grad
    np.testing.assert_allclose(clipped["w"]["kernel"], [0.6, 0.8, 0.0, 0.0], rtol=1e-6)


def test_peak_lr_lives_in_the_optimizer_state():
    """The replicas of one compiled run train with their own peak lr: the state's ``peak_lr``
    scales the update, and make_lr_fn reports the schedule at the state's step."""
    opt_cfg = optim.OptConfig(lrs=(1e-2, 1e-3), warmup_steps=4, decay_end_step=8, weight_decay=0.0)
    tx = optim.make_optimizer(opt_cfg)
    params = {"w": {"kernel": jnp.ones(3)}}
    grads = {"w": {"kernel": jnp.array([1.0, -2.0, 0.5])}}
    updates = {}
    for lr in opt_cfg.lrs:
        state = train.init_train_state(params, tx, jax.random.key(0), lr)
        assert float(optim.make_lr_fn(opt_cfg)(state)) == pytest.approx(lr / 4)  # warmup: lr·1/4 at step 0
        updates[lr] = np.asarray(tx.update(grads, state.opt_state, params)[0]["w"]["kernel"])
    np.testing.assert_allclose(updates[1e-2], 10 * updates[1e-3], rtol=1e-5)
    default = train.init_train_state(params, tx, jax.random.key(0))
    assert float(default.opt_state.hyperparams["peak_lr"]) == pytest.approx(opt_cfg.lrs[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(lrs=()), "one or more learning rates"),
    (dict(lrs=(1e-3, -1.0)), "> 0"),
    (dict(lrs=(1e-3, 1e-3)), "distinct"),
    (dict(lrs=(1e-3,), min_lr=1.0), r"min_lr <= max\(lrs\)"),
    (dict(warmup_steps=10, decay_end_step=5), "warmup_steps <= decay_end_step"),
    (dict(b2=1.0), "b2 must be in"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(clip_norm=-1.0), "clip_norm"),
])
def test_config_is_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.OptConfig(**kwargs)


def test_lrs_become_a_tuple_of_floats():
    assert optim.OptConfig(lrs=[1e-3, 3e-4]).lrs == (1e-3, 3e-4)
    assert optim.OptConfig(lrs=1e-3).lrs == (1e-3,)
    assert optim.OptConfig().lrs == (1e-3,)  # SPEC §5

"""Fine-tuning losses (SPEC §8): the formulas on hand numbers, the full losses against an independent
numpy implementation on a tiny real model, the frozen DPO reference, single-β DPO, unbounded
unlearning. (ΔW arithmetic across methods: test_analysis_interventions.py.)"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_mech import finetune_losses as fl
from safety_mech import grammar as gr
from safety_mech import model as model_lib

T, B = 12, 5
MODEL = model_lib.ModelConfig(vocab_size=gr.VOCAB_SIZE, n_layer=1, n_head=2, d_model=16, d_mlp=32, seq_len=T)
NORMS = ("seq_len", "tokens", "none")
_logits = jax.jit(model_lib.apply, static_argnums=1)
_loss = jax.jit(lambda p, r, b, cfg: fl.LOSSES[cfg.name](p, r, b, cfg), static_argnums=3)


def _cfg(name, normalize="seq_len", **kw):
    return fl.MethodConfig(name=name, normalize=normalize, model=MODEL, **kw)


@pytest.fixture(scope="module")
def setup():
    """Policy and reference params (different draws) and a random batch with uneven masks (one
    example of the undesired side has no target token at all)."""
    params = model_lib.init_params(jax.random.key(0), MODEL)
    ref = model_lib.init_params(jax.random.key(1), MODEL)
    rng = np.random.default_rng(0)  # numpy: eager jax.random ops would each compile
    tw, tl = rng.integers(0, gr.VOCAB_SIZE, (2, B, T))
    mw, ml = np.arange(T) >= rng.integers(2, T - 2, (2, B, 1))  # response = a suffix of random length
    ml[3] = False
    batch = {"tokens_desired": tw, "mask_desired": mw, "tokens_undesired": tl, "mask_undesired": ml,
             "unsafe": np.array([True, False, False, True, False])}
    return params, ref, jax.tree.map(jnp.asarray, batch)


# ------------------------------------------------------------------ numpy reference of SPEC §8


def _np_completion(params, tokens, mask, normalize):
    """ℓ per example and (n_tokens, n_correct), from model.apply logits with a float64 log-softmax."""
    logits = np.asarray(_logits(params, MODEL, tokens[:, :-1]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    tgt = np.asarray(tokens[:, 1:])
    ce = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    m = np.asarray(mask[:, 1:], np.float64)
    n = {"seq_len": np.full(len(m), T - 1.0), "tokens": np.maximum(m.sum(-1), 1.0), "none": np.ones(len(m))}
    return (ce * m).sum(-1) / n[normalize], m.sum(), ((logits.argmax(-1) == tgt) * m).sum()


def _np_loss(name, params, ref, batch, normalize, beta_w=0.1, beta_l=0.01, w_w=1.0, w_l=0.1):
    l_w, n_w, c_w = _np_completion(params, batch["tokens_desired"], batch["mask_desired"], normalize)
    l_l, _, _ = _np_completion(params, batch["tokens_undesired"], batch["mask_undesired"], normalize)
    aux = {"logp_desired": -l_w.mean(), "logp_undesired": -l_l.mean(), "accuracy": c_w / n_w,
           "frac_unsafe": np.mean(batch["unsafe"])}
    if name == "ssft":
        return l_w.mean(), aux
    if name == "unlearn":
        return (w_w * l_w - w_l * l_l).mean(), aux
    r_w, _, _ = _np_completion(ref, batch["tokens_desired"], batch["mask_desired"], normalize)
    r_l, _, _ = _np_completion(ref, batch["tokens_undesired"], batch["mask_undesired"], normalize)
    chosen, rejected = beta_w * (r_w - l_w), beta_l * (r_l - l_l)
    margin = chosen - rejected
    aux.update(reward_chosen=chosen.mean(), reward_rejected=rejected.mean(), reward_margin=margin.mean(),
               reward_accuracy=(margin > 0).mean())
    return np.log1p(np.exp(-margin)).mean(), aux


# ------------------------------------------------------------------ tests


def test_formulas_on_hand_numbers():
    # DPO: r_w = 0.1·(2.5 − 2.0) = 0.05, r_l = 0.01·(0.5 − 1.0) = −0.005, margin 0.055
    loss, r_w, r_l = fl.dpo_objective(jnp.array(2.0), jnp.array(1.0), jnp.array(2.5), jnp.array(0.5), 0.1, 0.01)
    np.testing.assert_allclose([r_w, r_l], [0.05, -0.005], rtol=1e-6)
    np.testing.assert_allclose(loss, math.log(1 + math.exp(-0.055)), rtol=1e-6)
    # policy == reference: margin 0, loss log 2
    loss, _, _ = fl.dpo_objective(*jnp.array([1.3, 0.7, 1.3, 0.7]), 0.1, 0.01)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
    # log_sigmoid keeps extreme margins finite: −log σ(−1000) = 1000, −log σ(1000) = 0
    loss, _, _ = fl.dpo_objective(jnp.array([1e4, 0.0]), jnp.zeros(2), jnp.array([0.0, 1e4]), jnp.zeros(2), 0.1, 0.0)
    np.testing.assert_allclose(loss, [1000.0, 0.0], atol=1e-4)
    # unlearning: 1·2 − 0.1·3 = 1.7
    np.testing.assert_allclose(fl.unlearn_objective(jnp.array(2.0), jnp.array(3.0), 1.0, 0.1), 1.7, rtol=1e-6)


def test_losses_match_numpy(setup):
    params, ref, batch = setup
    cfgs = {(name, norm): _cfg(name, norm) for name in fl.METHODS for norm in NORMS}
    got = jax.jit(lambda p, r, b: {k: fl.LOSSES[k[0]](p, r, b, c) for k, c in cfgs.items()})(params, ref, batch)
    for (name, norm), (loss, aux) in got.items():
        want_loss, want_aux = _np_loss(name, params, ref, batch, norm)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7, err_msg=f"{name} {norm}")
        assert set(aux) == set(want_aux), (name, sorted(aux))
        for k, v in want_aux.items():
            np.testing.assert_allclose(aux[k], v, rtol=1e-5, atol=1e-7, err_msg=f"{name} {norm} {k}")
    # the normalisations differ only by the per-example denominator
    l_seq, l_none = got[("ssft", "seq_len")][0], got[("ssft", "none")][0]
    np.testing.assert_allclose(l_none, l_seq * (T - 1), rtol=1e-5)
    with pytest.raises(ValueError, match="normalize"):
        fl.MethodConfig(normalize="mean")
    with pytest.raises(ValueError, match="name"):
        fl.MethodConfig(name="rlhf")


def test_dpo_reference_is_frozen(setup):
    params, ref, batch = setup
    cfg = _cfg("dpo")
    grad_ref = jax.jit(jax.grad(lambda r: fl.dpo_loss(params, r, batch, cfg)[0]))(ref)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grad_ref))
    # perturbing only the reference leaves the policy's own ℓ untouched and the loss finite
    shifted = jax.tree.map(lambda x: x + 0.05, ref)
    (loss_a, aux_a), (loss_b, aux_b) = (_loss(params, r, batch, cfg) for r in (ref, shifted))
    assert aux_a["logp_desired"] == aux_b["logp_desired"] and loss_a != loss_b and np.isfinite(loss_b)
    # policy == reference: every margin is 0 (up to the compiler's rounding), loss log 2
    loss, aux = _loss(params, params, batch, cfg)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
    assert abs(aux["reward_margin"]) < 1e-6
    with pytest.raises(ValueError, match="ref_params"):
        fl.dpo_loss(params, None, batch, cfg)


def test_single_beta_is_one_config_change(setup):
    params, ref, batch = setup
    cfgs = (_cfg("dpo", beta=0.1), _cfg("dpo", beta_w=0.1, beta_l=0.1), _cfg("dpo"))
    textbook, explicit, ref_betas = jax.jit(lambda p, r, b: [fl.dpo_loss(p, r, b, c)[0] for c in cfgs])(
        params, ref, batch)
    assert textbook == explicit and textbook != ref_betas
    assert fl.MethodConfig(beta=0.3).betas == (0.3, 0.3) and fl.MethodConfig().betas == (0.1, 0.01)
    np.testing.assert_allclose(textbook, _np_loss("dpo", params, ref, batch, "seq_len", 0.1, 0.1)[0], rtol=1e-5)


def test_unlearning_is_unbounded(setup):
    # the formula: ascending ℓ(y_l) lowers the loss linearly, without a floor (DPO and SSFT are >= 0)
    l_l = jnp.array([1.0, 10.0, 1e3, 1e6])
    np.testing.assert_allclose(fl.unlearn_objective(2.0, l_l, 1.0, 0.1), 2.0 - 0.1 * l_l, rtol=1e-6)
    # the full loss on the tiny model: sharpening the output head makes the (mostly wrong) argmax
    # more confident, ℓ(y_l) grows with the scale, and the loss keeps falling
    params, _, batch = setup
    cfg = _cfg("unlearn", w_w=0.0)
    scaled = lambda c: {**params, "lm_head": {"kernel": c * params["lm_head"]["kernel"]}}  # noqa: E731
    values = [float(_loss(scaled(c), None, batch, cfg)[0]) for c in (1.0, 1e2, 1e4)]
    assert values[0] > values[1] > values[2] and values[2] < -10.0 * abs(values[0]), values

"""The soft-token attack (SPEC §9): slot insertion, the embedding path against the token path,
the projection onto each soft token's ball, and the attack raising the harmful output's likelihood."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_mech import attacks, losses, metrics, replicas
from safety_mech import data as data_lib
from safety_mech import grammar as gr
from safety_mech import model as model_lib

DATA = data_lib.DataConfig(min_len=3, max_len=4, p_four_iid=0.0)
N = 8


@pytest.fixture(scope="module")
def unsafe():
    return metrics.sample_eval_data(jax.random.key(0), DATA, "unsafe", N)


def _model(pos):
    return model_lib.ModelConfig(seq_len=DATA.T, n_layer=1, n_head=2, d_model=16, d_mlp=32, pos=pos, block="prenorm")


def test_insert_soft_slots_shifts_the_response_by_k(unsafe):
    k, T = 2, DATA.T
    att = jax.tree.map(np.asarray, attacks.insert_soft_slots(unsafe, k, T + k))
    for b in range(N):
        p = int(unsafe["prompt_len"][b])
        assert att["prompt_len"][b] == p + k
        np.testing.assert_array_equal(np.flatnonzero(att["soft_mask"][b]), [p - 1, p])  # after the text
        np.testing.assert_array_equal(att["soft_slot"][b, p - 1:p + 1], [0, 1])
        np.testing.assert_array_equal(att["prompt"][b, :p - 1], unsafe["prompt"][b, :p - 1])  # BOS .. t_L
        assert att["prompt"][b, p + 1] == gr.EOT and (att["prompt"][b, p + 2:] == gr.PAD).all()
        for t in metrics.TARGETS:
            np.testing.assert_array_equal(att[f"tokens_{t}"][b, p - 1 + k:], unsafe[f"tokens_{t}"][b, p - 1:])
            np.testing.assert_array_equal(att[f"gov_mask_{t}"][b, p - 1 + k:], unsafe[f"gov_mask_{t}"][b, p - 1:])
            assert not att[f"gov_mask_{t}"][b, :p - 1 + k].any()


def test_soft_tokens_equal_to_token_embeddings_give_the_token_loss(unsafe):
    """The embedding path: soft tokens set to the embeddings of two letters give the teacher-forced
    loss of the sequence with those letters inserted."""
    cfg = _model("sinusoidal")
    params = model_lib.init_params(jax.random.key(1), cfg)
    k, length = 2, DATA.T + 2
    wide = attacks.attack_model_cfg(cfg, length)
    att = attacks.insert_soft_slots(unsafe, k, length)
    letters = jnp.array([gr.LETTER0 + 3, gr.LETTER0 + 7])
    soft_BxKxD = jnp.broadcast_to(params["wte"]["embedding"][letters], (N, k, cfg.d_model))
    loss_B = jax.jit(attacks.harmful_loss, static_argnums=1)(params, wide, att, soft_BxKxD)
    tokens = jnp.where(att["soft_mask"], letters[att["soft_slot"]], att["tokens_harmful"])
    ce, _ = jax.jit(losses.token_cross_entropy, static_argnums=1)(params, wide, tokens)
    m = att["gov_mask_harmful"][:, 1:]
    np.testing.assert_allclose(loss_B, (ce * m).sum(-1) / m.sum(-1), rtol=1e-5)


def test_learned_positions_cut_the_targets_at_seq_len(unsafe):
    T = DATA.T
    last = np.max(np.where(unsafe["gov_mask_true"], np.arange(T), 0), axis=-1)  # = T - 2 for the longest texts
    first = np.min(np.where(unsafe["gov_mask_refusal"] | unsafe["gov_mask_true"], np.arange(T), T), axis=-1)
    assert attacks.attack_length(_model("learned"), T, 2) == T and attacks.attack_length(_model("sinusoidal"), T, 2) == T + 2
    for k in (1, 2, 9):
        usable, truncated = attacks.attack_coverage(unsafe, k, T)
        np.testing.assert_array_equal(truncated, last + k >= T)
        np.testing.assert_array_equal(usable, first + k < T)
    att = jax.tree.map(np.asarray, attacks.insert_soft_slots(unsafe, 2, T))  # the cut targets lose their tail only
    np.testing.assert_array_equal(att["gov_mask_true"].sum(-1),
                                  unsafe["gov_mask_true"].sum(-1) - np.maximum(last + 2 - (T - 1), 0))


def test_project_to_ball():
    x = jnp.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    np.testing.assert_allclose(attacks.project_to_ball(x, 1.0), [[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]], rtol=1e-6)


def test_attack_stays_in_the_ball_and_raises_the_harmful_likelihood(unsafe):
    """Sinusoidal positions: every example fits (learned positions, which drop the examples that do
    not fit, are exercised by test_evaluation's end-to-end run of the tiny preset's model)."""
    cfg = _model("sinusoidal")
    # GPT-2 init (std 0.02) makes a 1-layer model almost blind to its input; larger weights give
    # the soft tokens a measurable effect on the loss
    params = jax.tree.map(lambda x: 5.0 * x, model_lib.init_params(jax.random.key(2), cfg))
    budget = 2.0
    attack_eval = attacks.make_attack_eval(cfg, attacks.AttackConfig(steps=8, budget=budget), chunk=N)
    out, counts = attack_eval(replicas.stack([params]), unsafe, N, jax.random.key(3))  # one replica
    assert counts == {"n": N, "n_truncated": 0}  # sinusoidal positions extend to T + k
    assert out["soft"].shape == (1, N, 2, cfg.d_model)
    out = replicas.select(out, 0)
    eps = budget * float(attacks.embedding_radius(params))
    assert np.linalg.norm(out["soft"], axis=-1).max() <= eps + 1e-5  # every soft token, every example
    assert np.all(out["loss_after"] <= out["loss_before"]) and np.mean(out["loss_before"] - out["loss_after"]) > 0.02
    for name in ("gen_null", "gen_strict", "gen_lenient"):
        assert out[name].shape == (N,) and out[name].dtype == bool
    np.testing.assert_array_equal(out["gen_lenient"], ~out["gen_null"])


def test_adversarial_inputs_for_the_analyses(unsafe):
    """The analyses' contract (analysis/suite.py): the embeddings of the attacked teacher-forced sequence (true
    output shifted by k) and its prompt length, every example kept."""
    cfg = _model("learned")
    params = model_lib.init_params(jax.random.key(4), cfg)
    out = attacks.adversarial_inputs(params, cfg, unsafe, jax.random.key(5), attacks.AttackConfig(steps=2))
    assert out["embeddings"].shape == (N, DATA.T, cfg.d_model)  # learned positions: no room beyond seq_len
    np.testing.assert_array_equal(out["prompt_len"], unsafe["prompt_len"] + 2)
    att = jax.tree.map(np.asarray, attacks.insert_soft_slots(unsafe, 2, DATA.T))
    tokens = params["wte"]["embedding"][att["tokens_true"]]
    np.testing.assert_allclose(out["embeddings"][~att["soft_mask"]], np.asarray(tokens)[~att["soft_mask"]])
    soft_norms = np.linalg.norm(out["embeddings"][att["soft_mask"]], axis=-1)
    assert soft_norms.max() <= float(attacks.embedding_radius(params)) + 1e-5


def test_adversarial_from_soft_rebuilds_the_attacked_inputs(unsafe):
    """The saved soft tokens of an attack (what evaluation.py keeps, per replica) give the analyses
    the inputs adversarial_inputs builds when it attacks itself with the same key."""
    cfg = _model("sinusoidal")
    params = jax.tree.map(lambda x: 5.0 * x, model_lib.init_params(jax.random.key(6), cfg))
    attack_cfg = attacks.AttackConfig(steps=3)
    key = jax.random.key(7)
    # two replicas: the second is the model under study, the first another one
    other = jax.tree.map(lambda x: 5.0 * x, model_lib.init_params(jax.random.key(8), cfg))
    attacked, counts = attacks.make_attack_eval(cfg, attack_cfg, chunk=N)(replicas.stack([other, params]), unsafe,
                                                                         N, key)
    assert counts["n"] == N and attacked["soft"].shape == (2, N, attack_cfg.k, cfg.d_model)
    rebuilt = attacks.adversarial_from_soft(params, cfg, unsafe, attacked["soft"][1])
    direct = attacks.adversarial_inputs(params, cfg, unsafe, key, attack_cfg)
    np.testing.assert_array_equal(rebuilt["prompt_len"], direct["prompt_len"])
    np.testing.assert_allclose(rebuilt["embeddings"], direct["embeddings"], rtol=1e-6, atol=1e-7)
    assert not np.allclose(attacked["soft"][0], attacked["soft"][1])
    with pytest.raises(ValueError, match="do not fit"):
        attacks.adversarial_from_soft(params, cfg, unsafe, attacked["soft"][1][:-1])

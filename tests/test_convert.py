"""REF checkpoint conversion (SPEC §6): our logits must match an independent float64 numpy forward pass
of REF's block computed from the PyTorch-layout (out x in) weights."""
import argparse
import dataclasses
import sys
import warnings

import jax
import numpy as np
import pytest

from safety_mech import convert, model

L, H, C, F, V, V_REF, T_REF = 2, 2, 12, 48, 54, 59, 20  # V_REF: 5 never-trained dup rows appended
CFG = model.ModelConfig(vocab_size=V, seq_len=12, n_layer=L, n_head=H, d_model=C, d_mlp=F)
apply = jax.jit(model.apply, static_argnums=1)


def _ref_state_dict(seed=0, prefix=""):
    rng = np.random.default_rng(seed)

    def w(*shape, s=0.3):
        return (s * rng.standard_normal(shape)).astype(np.float32)

    pos = np.arange(T_REF)[:, None]
    freq = np.exp(np.arange(0, C, 2) * (-np.log(10000.0) / C))
    pe = np.zeros((1, T_REF, C), np.float32)
    pe[0, :, 0::2], pe[0, :, 1::2] = np.sin(pos * freq), np.cos(pos * freq)
    sd = {"transformer.wte.weight": w(V_REF, C, s=1.0), "transformer.wpe.pe": pe,
          "transformer.ln_f.weight": 1 + w(C, s=0.1), "transformer.ln_f.bias": w(C, s=0.1),
          "lm_head.weight": w(V_REF, C)}
    for i in range(L):
        h = f"transformer.h.{i}."
        sd.update({
            h + "ln_1.weight": 1 + w(C, s=0.1), h + "ln_1.bias": w(C, s=0.1),
            h + "ln_2.weight": w(C), h + "ln_2.bias": w(C),  # REF's unused ln_2: must be ignored
            h + "attn.c_attn.weight": w(3 * C, C), h + "attn.c_attn.bias": w(3 * C, s=0.1),
            h + "attn.c_proj.weight": w(C, C), h + "attn.c_proj.bias": w(C, s=0.1),
            h + "attn.bias": np.tril(np.ones((T_REF, T_REF), np.float32))[None, None],  # mask buffer
            h + "c_fc.weight": w(F, C), h + "c_fc.bias": w(F, s=0.1),
            h + "c_proj.weight": w(C, F), h + "c_proj.bias": w(C, s=0.1),
        })
    return {prefix + k: v for k, v in sd.items()}


def _numpy_ref_logits(sd, tokens):
    """REF's paper block in float64 numpy, PyTorch conventions: y = x @ W.T + b."""
    g = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    B, T = tokens.shape
    K = C // H

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * g[name + ".weight"] + g[name + ".bias"]

    def lin(x, name):
        return x @ g[name + ".weight"].T + g[name + ".bias"]

    x = g["transformer.wte.weight"][tokens] + g["transformer.wpe.pe"][0, :T]
    for i in range(L):
        h = f"transformer.h.{i}."
        x = ln(x, h + "ln_1")
        q, k, v = np.split(lin(x, h + "attn.c_attn"), 3, axis=-1)
        q, k, v = (a.reshape(B, T, H, K).transpose(0, 2, 1, 3) for a in (q, k, v))
        att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(K)
        att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + lin(y, h + "attn.c_proj")
        u = lin(x, h + "c_fc")
        x = x + lin(0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3))), h + "c_proj")
    return ln(x, "transformer.ln_f") @ g["lm_head.weight"].T


@pytest.mark.parametrize("prefix", ["", "module."])
def test_logits_match_numpy_reference(prefix):
    sd = _ref_state_dict(prefix=prefix)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sinusoid check passes, ignored keys are silent
        params = convert.params_from_ref_state_dict(sd, CFG)
    assert params["wte"]["embedding"].shape == (V, C) and params["lm_head"]["kernel"].shape == (C, V)
    assert params["h_0"]["mlp"]["c_fc"]["kernel"].shape == (C, F) and "ln_2" not in params["h_0"]
    tokens = np.random.default_rng(1).integers(0, V, (3, CFG.seq_len))
    ours = np.asarray(apply(params, CFG, tokens))
    ref = _numpy_ref_logits(_ref_state_dict(), tokens)[..., :V]
    assert np.abs(ref).max() > 1  # the weights are large enough for a real check
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_config_from_state_dict():
    cfg = convert.config_from_ref_state_dict(_ref_state_dict(prefix="module."), n_head=H, seq_len=12)
    assert cfg == CFG
    assert convert.config_from_ref_state_dict(_ref_state_dict()).n_head == 6  # default when not given
    with pytest.raises(ValueError, match="n_head"):
        convert.config_from_ref_state_dict(_ref_state_dict(), n_head=5)


@pytest.mark.parametrize("edit, cfg, match", [
    (lambda sd: sd.pop("transformer.h.1.c_fc.weight"), CFG, "transformer.h.1.c_fc.weight"),
    (lambda sd: sd.pop("lm_head.weight"), CFG, "lm_head.weight"),
    (lambda sd: sd.update({"transformer.h.0.attn.c_attn.weight": np.zeros((3 * C, C + 1))}), CFG,
     "transformer.h.0.attn.c_attn.weight"),
    (lambda sd: sd.update({"transformer.wte.weight": np.zeros((V - 1, C))}), CFG, "transformer.wte.weight"),
    (lambda sd: None, dataclasses.replace(CFG, n_layer=3), "n_layer=3"),
    (lambda sd: None, dataclasses.replace(CFG, d_model=24), "shape"),
    (lambda sd: None, dataclasses.replace(CFG, block="prenorm"), "paper"),
], ids=["missing_c_fc", "missing_head", "c_attn_shape", "vocab_too_small", "n_layer", "d_model", "block"])
def test_errors(edit, cfg, match):
    sd = _ref_state_dict()
    edit(sd)
    with pytest.raises(ValueError, match=match):
        convert.params_from_ref_state_dict(sd, cfg)


def test_warnings_for_wrong_sinusoid_and_unknown_keys():
    sd = _ref_state_dict()
    sd["transformer.wpe.pe"] = sd["transformer.wpe.pe"] + 1e-3
    sd["transformer.h.0.mystery"] = np.zeros(3)
    with pytest.warns(UserWarning) as record:
        convert.params_from_ref_state_dict(sd, CFG)
    text = " ".join(str(r.message) for r in record)
    assert "sinusoid" in text and "transformer.h.0.mystery" in text


def test_load_without_torch_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"pip install -e \.\[torch\]"):
        convert.load_ref_checkpoint(tmp_path / "x.pt", CFG)


@pytest.mark.parametrize("wrap", ["raw", "model", "state_dict", "pickled_config"])
def test_torch_round_trip(tmp_path, wrap):
    torch = pytest.importorskip("torch")
    sd = _ref_state_dict(prefix="module.")
    tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
    obj = {"raw": tsd, "model": {"model": tsd, "step": 7}, "state_dict": {"state_dict": tsd},
           # a non-tensor object: weights_only=True refuses it, the loader warns and falls back
           "pickled_config": {"model": tsd, "config": argparse.Namespace(n_layer=L)}}[wrap]
    torch.save(obj, tmp_path / "ckpt.pt")
    expected = convert.params_from_ref_state_dict(sd, CFG)
    for cfg in (CFG, None):  # None: inferred from the file (n_head does not change any shape)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            params = convert.load_ref_checkpoint(tmp_path / "ckpt.pt", cfg)
        assert any("weights_only" in str(r.message) for r in record) == (wrap == "pickled_config")
        assert jax.tree.structure(params) == jax.tree.structure(expected)
        jax.tree.map(np.testing.assert_array_equal, params, expected)

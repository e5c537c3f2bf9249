"""REF (PyTorch) checkpoint -> params of :mod:`safety_mech.model` (SPEC §6).

REF state_dict keys, optionally prefixed ``module.`` (DDP) or ``_orig_mod.`` (torch.compile)::

    transformer.wte.weight                 [V', C]   V' = 54, or 59 in fine-tuned checkpoints
    transformer.wpe.pe                     [1, T', C] sinusoid buffer (only checked against ours)
    transformer.h.{i}.ln_1.{weight,bias}   [C]
    transformer.h.{i}.attn.c_attn.{weight,bias}  [3C, C], [3C]   q|k|v, heads contiguous
    transformer.h.{i}.attn.c_proj.{weight,bias}  [C, C], [C]
    transformer.h.{i}.c_fc.{weight,bias}         [F, C], [F]    block-level MLP (not under .mlp)
    transformer.h.{i}.c_proj.{weight,bias}       [C, F], [C]
    transformer.ln_f.{weight,bias}         [C]
    lm_head.weight                         [V', C]   no bias

PyTorch weights are ``out x in``; our kernels are ``in x out``, so every dense weight is transposed.
Ignored: the causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` and REF's unused ``ln_2``.
Vocabulary rows ``>= cfg.vocab_size`` (REF's never-trained ``dup1..dup5``) are dropped from ``wte``
and ``lm_head``. REF's model is the "paper" block with sinusoidal positions, so ``cfg`` must say so.
"""
from __future__ import annotations

import pickle
import re
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from safety_mech.model import ModelConfig, sinusoidal_positions


class ConvertError(ValueError):
    """A REF checkpoint that does not fit the model config, or is not a REF checkpoint (one line)."""


_PREFIXES = ("module.", "_orig_mod.")
_IGNORED = re.compile(r"transformer\.h\.\d+\.(attn\.bias|attn\.masked_bias|ln_2\.(weight|bias))$")
_LAYER = re.compile(r"transformer\.h\.(\d+)\.")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch.Tensor, without importing torch
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()  # bfloat16 has no numpy dtype
    return np.asarray(x)


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _normalise(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {_strip(k): _to_numpy(v) for k, v in state_dict.items()}


def _n_layers(sd: Mapping[str, Any]) -> int:
    ids = {int(m.group(1)) for k in sd if (m := _LAYER.match(k))}
    return max(ids) + 1 if ids else 0


def config_from_ref_state_dict(state_dict: Mapping[str, Any], **overrides) -> ModelConfig:
    """ModelConfig matching a REF state_dict: n_layer, d_model, d_mlp from the weights; vocab_size
    54 (extra rows are dropped); n_head and seq_len cannot be inferred (defaults 6, 115): pass them in
    ``overrides`` if the checkpoint differs."""
    sd = _normalise(state_dict)
    if "transformer.wte.weight" not in sd:
        raise ConvertError("no 'transformer.wte.weight' in the state_dict: is this a REF checkpoint?")
    vocab, d_model = sd["transformer.wte.weight"].shape
    fields = dict(n_layer=_n_layers(sd), d_model=int(d_model),
                  vocab_size=min(int(vocab), ModelConfig.vocab_size), block="paper", pos="sinusoidal")
    if "transformer.h.0.c_fc.weight" in sd:
        fields["d_mlp"] = int(sd["transformer.h.0.c_fc.weight"].shape[0])
    fields.update(overrides)
    return ModelConfig(**fields)


def params_from_ref_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig) -> dict:
    """Convert a REF state_dict (name -> numpy or torch tensor) into our float32 params dict."""
    if cfg.block != "paper" or cfg.pos != "sinusoidal":
        raise ConvertError(f"REF checkpoints are block='paper', pos='sinusoidal'; got block={cfg.block!r}, "
                           f"pos={cfg.pos!r}: use dataclasses.replace(cfg, block='paper', pos='sinusoidal')")
    sd = _normalise(state_dict)
    C, F, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size
    fix = "pass a cfg that matches the checkpoint, e.g. config_from_ref_state_dict(state_dict)"
    used = set()

    def get(key, shape):
        if key not in sd:
            raise ConvertError(f"missing key {key!r} in the REF state_dict (an incomplete file, or not REF's model); "
                               "use a complete REF checkpoint")
        used.add(key)
        x = sd[key]
        if x.shape != shape:
            raise ConvertError(f"{key!r} has shape {tuple(x.shape)}, expected {shape}; {fix}")
        return np.asarray(x, np.float32)

    def get_vocab(key):  # [V', C] with V' >= V: drop the never-trained rows >= V (REF's dup1..dup5)
        rows = sd[key].shape[0] if key in sd and sd[key].ndim == 2 else V
        return get(key, (max(rows, V), C))[:V]

    def dense(prefix, n_in, n_out):  # PyTorch weight [out, in] -> kernel [in, out]
        return {"kernel": get(prefix + ".weight", (n_out, n_in)).T.copy(),
                "bias": get(prefix + ".bias", (n_out,))}

    def ln(prefix):
        return {"scale": get(prefix + ".weight", (C,)), "bias": get(prefix + ".bias", (C,))}

    n_sd = _n_layers(sd)
    if n_sd != cfg.n_layer:
        raise ConvertError(f"the state_dict has {n_sd} layers but cfg.n_layer={cfg.n_layer}; {fix}")

    params = {"wte": {"embedding": get_vocab("transformer.wte.weight")}}
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}"
        params[f"h_{i}"] = {
            "ln_1": ln(h + ".ln_1"),
            "attn": {"c_attn": dense(h + ".attn.c_attn", C, 3 * C), "c_proj": dense(h + ".attn.c_proj", C, C)},
            "mlp": {"c_fc": dense(h + ".c_fc", C, F), "c_proj": dense(h + ".c_proj", F, C)},
        }
    params["ln_f"] = ln("transformer.ln_f")
    params["lm_head"] = {"kernel": get_vocab("lm_head.weight").T.copy()}

    if "transformer.wpe.pe" in sd:
        used.add("transformer.wpe.pe")
        pe = sd["transformer.wpe.pe"]
        pe = pe.reshape(-1, pe.shape[-1]).astype(np.float64)
        n = min(pe.shape[0], cfg.seq_len)
        if pe.shape[1] != C or np.abs(pe[:n] - sinusoidal_positions(n, C)).max() > 1e-5:
            warnings.warn("REF's transformer.wpe.pe differs from our sinusoid by > 1e-5: logits will differ")
    unknown = sorted(k for k in sd if k not in used and not _IGNORED.match(k))
    if unknown:
        warnings.warn(f"ignoring unrecognised REF state_dict keys: {unknown}")
    return jax.tree.map(jnp.asarray, params)


def load_ref_state_dict(path) -> dict[str, np.ndarray]:
    """Read a REF ``.pt`` file (a raw state_dict, or a dict holding it under "model"/"state_dict")
    into name -> numpy float arrays. Needs torch (the optional extra)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("loading REF checkpoints needs torch: pip install -e .[torch]") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch older than 1.13 has no weights_only
        obj = torch.load(path, map_location="cpu")
    except pickle.UnpicklingError:  # pickled non-tensor objects (e.g. a config class) beside the weights
        warnings.warn("torch.load(weights_only=True) refused the file; retrying with "
                      "weights_only=False, which runs the file's pickle code: only do this for trusted files")
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not any(_strip(k).endswith("wte.weight") for k in obj):
        raise ConvertError(f"{path}: no REF state_dict found (expected keys like 'transformer.wte.weight')")
    return _normalise(obj)


def load_ref_checkpoint(path, cfg: ModelConfig | None = None) -> dict:
    """params from a REF ``.pt`` file; ``cfg=None`` infers it with :func:`config_from_ref_state_dict`."""
    sd = load_ref_state_dict(path)
    return params_from_ref_state_dict(sd, cfg if cfg is not None else config_from_ref_state_dict(sd))


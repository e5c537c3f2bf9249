"""The transformer of SPEC §6: REF's "paper" block and a standard pre-norm GPT-2 block.

Written in plain JAX (no Flax module is needed for a fixed stack of dense layers); everything
outside this file sees the parameters as a plain nested dict of float32 ``jnp`` arrays.

Shape legend (nanodo style; names carry their shapes)::

    B batch   T positions (queries)   S positions (keys)   D d_model   H heads   K head dim (D / H)
    F d_mlp   V vocab                 L layers

Parameter layout (kernels are Flax ``in x out``, i.e. Wᵀ of SPEC §10's ``y = W x``)::

    wte/embedding               [V, D]     token embedding
    wpe/embedding               [T, D]     learned positions (pos="learned" only; sinusoidal is not a parameter)
    h_{i}/ln_1/{scale, bias}    [D]
    h_{i}/attn/c_attn/kernel    [D, 3D]    fused q|k|v along the output axis, heads contiguous in each
    h_{i}/attn/c_attn/bias      [3D]
    h_{i}/attn/c_proj/kernel    [D, D]     attention output projection
    h_{i}/attn/c_proj/bias      [D]
    h_{i}/ln_2/{scale, bias}    [D]        (block="prenorm" only)
    h_{i}/mlp/c_fc/kernel       [D, F]     "first MLP layer" (SPEC §10: W = kernelᵀ, F x D)
    h_{i}/mlp/c_fc/bias         [F]
    h_{i}/mlp/c_proj/kernel     [F, D]
    h_{i}/mlp/c_proj/bias       [D]
    ln_f/{scale, bias}          [D]
    lm_head/kernel              [D, V]     untied, no bias

The paper config (6 layers, 6 heads, D=192, F=768, V=54, sinusoidal) has 2,677,632 parameters outside
the output head (2,688,000 with it). The "2.71M" quoted for REF matches 2,677,632 plus REF's
160 x 192 sinusoid buffer (30,720), which is not a parameter here.

Blocks (LN = LayerNorm with eps, scale and bias; Attn = causal multi-head self-attention with output
projection; MLP = c_fc -> tanh-GELU -> c_proj)::

    paper   (REF, the paper's model):  x = LN1(x);  x = x + Attn(x);      x = x + MLP(x)
    prenorm (GPT-2):                   x = x + Attn(LN1(x));  x = x + MLP(LN2(x))

followed by ``ln_f`` and ``lm_head``. No dropout.

Captured activations (``capture=True``): each is stacked over layers as ``[L, B, T, D]`` (``mlp_hidden``
``[L, B, T, F]``), float32. With x the residual stream entering block i::

    name        block="paper"                         block="prenorm"
    block_in    x (layer 0: embedding + positions)    x
    attn_out    Attn(LN1(x)), before the add          Attn(LN1(x)), before the add
    mlp_in      LN1(x) + attn_out  (no norm)          LN2(x + attn_out)
    mlp_hidden  gelu(mlp_in @ c_fc.kernel + c_fc.bias), the MLP's F units (both blocks)
    mlp_out     MLP(mlp_in) = mlp_hidden @ c_proj.kernel + c_proj.bias, before the add (both blocks)
    resid_out   mlp_in + mlp_out                      x + attn_out + mlp_out
                (= block_in of layer i+1; ln_f(resid_out[L-1]) @ lm_head.kernel = logits)

Usage (cfg is frozen, hence hashable and static; with cfg bound by keyword, pass tokens by keyword)::

    fwd = jax.jit(functools.partial(apply, cfg=cfg))
    logits_BxTxV = fwd(params, tokens=tokens_BxT)

``dtype`` is the compute dtype of the matmul inputs; parameters stay float32, and the residual stream,
LayerNorm, softmax, matmul accumulation, logits and captured activations are float32. ``attention``
picks how a whole sequence's attention is computed (same numbers up to rounding): "einsum"
(:func:`attend`) or "fused" (:func:`fused_attend`, cuDNN's kernel on a GPU in bfloat16).

Building blocks, public so that an incremental decoder (``kv_cache.py``) runs this model's own code
one position at a time rather than a copy of it; ``apply`` is built from the same functions::

    check_params(params, cfg)                           structural params/config check
    embed(params, cfg, tokens)                          token embeddings [B, T, D]
    position_encoding(params, cfg, T | positions)       position rows [T, D] or [..., D]
    block(x_BxTxD, p, cfg, dt, attend=None, mask=None)  one block, with a hook for its attention
        layer_norm(x, p, eps)    qkv_heads(x_BxTxD, p_attn, cfg, dt) -> q, k, v [B, H, T, K]
        attend(q, k, v, visible_mask, dt) -> [B, H, T, K]    merge_heads(y_BxHxTxK, p_attn, cfg, dt)
        fused_attend(q, k, v, visible_mask, dt) -> [B, T, H, K]   (layout="bthk" of the two above)
        attention_mask(T, segment_ids)    dense(x, p, dt)
    unembed(params, cfg, x_BxTxD)                       ln_f + lm_head -> logits [B, T, V]
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_BLOCKS = ("paper", "prenorm")
_POSITIONS = ("sinusoidal", "learned")
_DTYPES = ("float32", "bfloat16")
_ATTENTIONS = ("einsum", "fused")
ACT_NAMES = ("block_in", "attn_out", "mlp_in", "mlp_hidden", "mlp_out", "resid_out")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters; defaults are the paper's model (SPEC §5-6). Frozen, so usable as a jit static."""

    vocab_size: int = 54
    seq_len: int = 115
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 192
    d_mlp: int = 768
    block: str = "paper"  # "paper" | "prenorm"
    pos: str = "sinusoidal"  # "sinusoidal" | "learned"
    ln_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16"
    attention: str = "einsum"  # "einsum" (attend) | "fused" (jax.nn.dot_product_attention, fused_attend)

    def __post_init__(self):
        if self.block not in _BLOCKS:
            raise ValueError(f"ModelConfig.block={self.block!r}; use one of {_BLOCKS}")
        if self.pos not in _POSITIONS:
            raise ValueError(f"ModelConfig.pos={self.pos!r}; use one of {_POSITIONS}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"ModelConfig.dtype={self.dtype!r}; use one of {_DTYPES}")
        if self.attention not in _ATTENTIONS:
            raise ValueError(f"ModelConfig.attention={self.attention!r}; use one of {_ATTENTIONS}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {self.d_model}")


def sinusoidal_positions(seq_len: int, d_model: int) -> np.ndarray:
    """REF's sinusoid, [T, D] float32: pe[p, 0::2] = sin(p w_i), pe[p, 1::2] = cos(p w_i),
    w_i = exp(-ln(10000) * 2i / D)."""
    pos_T1 = np.arange(seq_len, dtype=np.float64)[:, None]
    w = np.exp(-math.log(10000.0) * np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    pe_TxD = np.zeros((seq_len, d_model), np.float64)
    pe_TxD[:, 0::2] = np.sin(pos_T1 * w)
    pe_TxD[:, 1::2] = np.cos(pos_T1 * w)
    return pe_TxD.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


def init_params(key, cfg: ModelConfig) -> dict:
    """GPT-2 initialisation: N(0, 0.02) embeddings and kernels, N(0, 0.02/sqrt(2L)) for the two
    projections that write into the residual stream, zero biases, unit LayerNorm scales."""
    return _init_params(key, cfg)


@functools.partial(jax.jit, static_argnums=1)
def _init_params(key, cfg: ModelConfig) -> dict:
    # All normals come from one draw, sliced: one threefry instead of one per tensor compiles ~10x faster.
    D, F, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size
    std, std_out = 0.02, 0.02 / math.sqrt(2 * cfg.n_layer)
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
    normals = []  # (shape, std) in the order they are drawn

    def normal(shape, s):
        normals.append((shape, s))
        return len(normals) - 1  # placeholder, filled below

    def dense(n_in, n_out, s):
        return {"kernel": normal((n_in, n_out), s), "bias": zeros(n_out)}

    def ln():
        return {"scale": jnp.ones((D,), jnp.float32), "bias": zeros(D)}

    params = {"wte": {"embedding": normal((V, D), std)}}
    if cfg.pos == "learned":
        params["wpe"] = {"embedding": normal((cfg.seq_len, D), std)}
    for i in range(cfg.n_layer):
        layer = {
            "ln_1": ln(),
            "attn": {"c_attn": dense(D, 3 * D, std), "c_proj": dense(D, D, std_out)},
            "mlp": {"c_fc": dense(D, F, std), "c_proj": dense(F, D, std_out)},
        }
        if cfg.block == "prenorm":
            layer["ln_2"] = ln()
        params[f"h_{i}"] = layer
    params["ln_f"] = ln()
    params["lm_head"] = {"kernel": normal((D, V), std)}

    z = jax.random.normal(key, (sum(math.prod(shape) for shape, _ in normals),), jnp.float32)
    offsets = np.cumsum([0] + [math.prod(shape) for shape, _ in normals])
    drawn = [s * z[o:o + math.prod(shape)].reshape(shape) for (shape, s), o in zip(normals, offsets)]
    return jax.tree.map(lambda x: drawn[x] if isinstance(x, int) else x, params)


def count_params(params, exclude_head: bool = True) -> int:
    """Number of scalars in ``params``, without ``lm_head`` unless ``exclude_head=False``."""
    tree = {k: v for k, v in params.items() if not (exclude_head and k == "lm_head")}
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))  # arrays or eval_shape


def check_params(params, cfg: ModelConfig):
    """Trace-time structural checks of ``params`` against ``cfg`` (layer count, embedding shapes, block
    and position kind), so a config/params mismatch is a one-line ``ValueError``, not a KeyError deep
    in the forward pass. Called by ``apply`` and by anything else that runs the blocks itself."""
    V, D = cfg.vocab_size, cfg.d_model
    wte = params["wte"]["embedding"]
    if wte.shape != (V, D):
        raise ValueError(f"params wte has shape {wte.shape} but cfg wants (vocab_size, d_model)={(V, D)}")
    n_layer = sum(1 for k in params if k.startswith("h_"))
    if n_layer != cfg.n_layer:
        raise ValueError(f"params have {n_layer} layers but cfg.n_layer={cfg.n_layer}")
    if (cfg.pos == "learned") != ("wpe" in params):
        raise ValueError(f"cfg.pos={cfg.pos!r} but params {'lack' if cfg.pos == 'learned' else 'have'} 'wpe'")
    if cfg.pos == "learned" and params["wpe"]["embedding"].shape != (cfg.seq_len, D):
        raise ValueError(f"params wpe has shape {params['wpe']['embedding'].shape}, cfg wants {(cfg.seq_len, D)}")
    if (cfg.block == "prenorm") != ("ln_2" in params["h_0"]):
        raise ValueError(f"cfg.block={cfg.block!r} does not match params (ln_2 present: {'ln_2' in params['h_0']})")


# ----------------------------------------------------------------------------------------------
# Forward pass
# ----------------------------------------------------------------------------------------------


def embed(params, cfg: ModelConfig, tokens):
    """Token embedding lookup only, [B, T] int -> [B, T, D] float32 (positions are added in apply,
    see :func:`position_encoding`)."""
    tokens_BxT = _check_tokens(tokens, cfg)
    return jnp.take(params["wte"]["embedding"], tokens_BxT, axis=0)


def _check_tokens(tokens, cfg):
    tokens = jnp.asarray(tokens) if not isinstance(tokens, jax.Array) else tokens
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.shape[1] > cfg.seq_len:
        raise ValueError(f"sequence length {tokens.shape[1]} > cfg.seq_len={cfg.seq_len}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        host = np.asarray(tokens)  # concrete ids (eager call or a jit constant): range-check them
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token ids span [{lo}, {hi}], outside [0, vocab_size={cfg.vocab_size})")
    return tokens


def position_encoding(params, cfg: ModelConfig, positions):
    """The position encodings ``apply`` adds to the embeddings (learned ``wpe`` rows, or the sinusoid
    of :func:`sinusoidal_positions`, per ``cfg.pos``), float32.

    ``positions`` is an int T, for positions 0..T-1 ([T, D], a slice of the table), or an int array
    of positions in [0, cfg.seq_len) of any shape ([..., D], gathered). Each row depends on its
    position only, so a decoder that adds one position's row at a time gets ``apply``'s numbers."""
    whole = isinstance(positions, (int, np.integer))
    if whole and positions > cfg.seq_len:
        raise ValueError(f"sequence length {positions} > cfg.seq_len={cfg.seq_len}")
    if cfg.pos == "learned":
        table = params["wpe"]["embedding"]
    else:
        table = jnp.asarray(sinusoidal_positions(positions if whole else cfg.seq_len, cfg.d_model))
    return table[:positions] if whole else jnp.take(table, positions, axis=0)


def layer_norm(x, p, eps):
    """LayerNorm over the last axis with ``p["scale"]`` and ``p["bias"]`` (float32 in, float32 out)."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def dense(x, p, dt):
    """x @ kernel (+ bias): inputs cast to the compute dtype, float32 accumulation and output."""
    y = jnp.matmul(x.astype(dt), p["kernel"].astype(dt), preferred_element_type=jnp.float32)
    return y + p["bias"] if "bias" in p else y


def qkv_heads(x_BxTxD, p, cfg, dt, layout="bhtk"):
    """Queries (scaled by 1/sqrt(K)), keys and values in the compute dtype, heads-first [B, H, T, K]
    (``layout="bhtk"``; ``"bthk"``: [B, T, H, K], :func:`fused_attend`'s), from the attention input
    ``x_BxTxD`` and the attention params ``p`` (``h_{i}/attn``). A decoder caches the keys and values
    in the heads-first layout.

    Three projections against column blocks of the fused ``c_attn`` kernel, each written straight into
    the layout: one fused [D, 3D] product split afterwards made XLA assemble the [B, T, 3D]
    gradient from three padded copies in the backward pass (~14% of the paper-size CPU step).
    """
    D, H = cfg.d_model, cfg.n_head
    K = D // H
    kernel_DxC, bias_C = p["c_attn"]["kernel"].astype(dt), p["c_attn"]["bias"]
    x_BxTxD = x_BxTxD.astype(dt)

    def project(i):
        w_DxHxK = kernel_DxC[:, i * D:(i + 1) * D].reshape(D, H, K)
        b_HxK = bias_C[i * D:(i + 1) * D].reshape(H, K)
        y = jnp.einsum(f"btd,dhk->{layout}", x_BxTxD, w_DxHxK, preferred_element_type=jnp.float32)
        return y + (b_HxK[:, None] if layout == "bhtk" else b_HxK)

    q = (project(0) * (1.0 / math.sqrt(K))).astype(dt)
    return q, project(1).astype(dt), project(2).astype(dt)


def merge_heads(y, p, cfg, dt, layout="bhtk"):
    """Output projection (``p["c_proj"]``, ``p`` the attention params) straight from the layout of
    the attention's result (:func:`qkv_heads`' ``layout``) -> [B, T, D] float32."""
    D, H = cfg.d_model, cfg.n_head
    w_HxKxD = p["c_proj"]["kernel"].astype(dt).reshape(H, D // H, D)
    y_BxTxD = jnp.einsum(f"{layout},hkd->btd", y.astype(dt), w_HxKxD, preferred_element_type=jnp.float32)
    return y_BxTxD + p["c_proj"]["bias"]


def attention_mask(T: int, segment_ids_BxT=None):
    """Which keys each query sees: causal [T, S], or with ``segment_ids_BxT`` (packed rows, see
    ``packing.py``) causal within equal ids, [B, 1, T, S]."""
    causal_TxS = jnp.tril(jnp.ones((T, T), bool))
    if segment_ids_BxT is None:
        return causal_TxS
    same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return (causal_TxS & same_BxTxS)[:, None]


def attend(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, visible_mask, dt):
    """Multi-head softmax attention of queries over keys and values (:func:`qkv_heads`' layout, the
    queries already scaled): [B, H, T, K], before the output projection (:func:`merge_heads`).

    ``visible_mask`` (bool, broadcastable to [B, H, T, S]) says which keys each query sees, e.g.
    :func:`attention_mask`'s [T, S] or [B, 1, T, S], or a decoder's [B, 1, 1, S] over its cache;
    every query must see at least one key. Softmax normalisation after the PV product (one pass fewer
    over the [B, H, T, S] scores): measured 2x faster than the naive einsum/softmax on CPU, same
    result. The mask enters as an additive 0 / −1e30 bias rather than a select: the select's backward
    pass cost a full pass over the scores per layer (~70 ms of the paper-size CPU step).
    """
    s_BxHxTxS = jnp.einsum("bhtk,bhsk->bhts", q_BxHxTxK, k_BxHxSxK, preferred_element_type=jnp.float32)
    s_BxHxTxS = s_BxHxTxS + jnp.where(visible_mask, 0.0, -1e30)
    # Subtracting the row max only guards exp against overflow; it cancels, so no gradient through it.
    e_BxHxTxS = jnp.exp(s_BxHxTxS - jax.lax.stop_gradient(s_BxHxTxS.max(-1, keepdims=True)))
    y_BxHxTxK = jnp.einsum("bhts,bhsk->bhtk", e_BxHxTxS.astype(dt), v_BxHxSxK,
                           preferred_element_type=jnp.float32)
    return y_BxHxTxK / e_BxHxTxS.sum(-1, keepdims=True)


def fused_attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, visible_mask, dt):
    """:func:`attend` of a whole causal sequence (``visible_mask`` None, or :func:`attention_mask`'s
    [B, 1, T, S] of packed rows) by ``jax.nn.dot_product_attention`` in the [B, T, H, K] layout:
    cuDNN's fused kernel on a GPU in bfloat16 where its shape rules hold (head size a multiple of 8,
    even lengths with a mask), XLA's elsewhere. Returns [B, T, H, K] in the compute dtype."""
    (T, K), S = q_BxTxHxK.shape[1::2], k_BxSxHxK.shape[1]
    cudnn = (jax.default_backend() == "gpu" and dt == jnp.bfloat16 and K % 8 == 0 and K <= 128
             and (visible_mask is None or T % 2 == S % 2 == 0))
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=visible_mask, scale=1.0,
                                        is_causal=True, implementation="cudnn" if cudnn else "xla")


def _attention(x_BxTxD, p, cfg, dt, mask=None):
    """Causal multi-head self-attention with output projection (``mask``: :func:`attention_mask`,
    default causal): :func:`qkv_heads`, :func:`attend` (or :func:`fused_attend` with
    ``cfg.attention="fused"``), :func:`merge_heads`."""
    if cfg.attention == "fused":
        q, k, v = qkv_heads(x_BxTxD, p, cfg, dt, layout="bthk")
        return merge_heads(fused_attend(q, k, v, mask, dt), p, cfg, dt, layout="bthk")
    q_BxHxTxK, k_BxHxSxK, v_BxHxSxK = qkv_heads(x_BxTxD, p, cfg, dt)
    T = x_BxTxD.shape[1]
    y_BxHxTxK = attend(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, attention_mask(T) if mask is None else mask, dt)
    return merge_heads(y_BxHxTxK, p, cfg, dt)


def _dense_via_transpose(x, p, dt):
    """:func:`dense` computed against a materialised kernel transpose [out, in]. Why: XLA's CPU backend
    ran the backward product dY @ kernel^T with a long contraction (c_fc: 768) at half the speed of
    an untransposed one; with the transpose made explicit (the barrier keeps XLA from folding it back
    into the dot) the backward is a plain product and the forward a fast one. Same values; the
    transpose is one small copy of the kernel per call on any backend."""
    kernel_OxI = jax.lax.optimization_barrier(p["kernel"].astype(dt).T)
    y = jnp.einsum("...i,oi->...o", x.astype(dt), kernel_OxI, preferred_element_type=jnp.float32)
    return y + p["bias"] if "bias" in p else y


def _mlp(x_BxTxD, p, dt):
    h_BxTxF = jax.nn.gelu(_dense_via_transpose(x_BxTxD, p["c_fc"], dt), approximate=True)
    return dense(h_BxTxF, p["c_proj"], dt), h_BxTxF


def block(x_BxTxD, p, cfg, dt, attend=None, mask=None):
    """One block (``p`` = ``params["h_{i}"]``); returns the new residual stream and this block's
    activations (see module doc).

    ``attend(attn_in_BxTxD, p_attn) -> [B, T, D]`` (a hook, not the function :func:`attend`)
    replaces the causal self-attention with its output projection (default: over ``x_BxTxD``'s own
    positions, visibility ``mask`` as in :func:`attend`, causal if None): ``kv_cache.decode_step``
    runs this same block for one position against cached keys and values."""
    if attend is None:
        attend = functools.partial(_attention, cfg=cfg, dt=dt, mask=mask)
    acts = {"block_in": x_BxTxD}
    if cfg.block == "paper":
        x_BxTxD = layer_norm(x_BxTxD, p["ln_1"], cfg.ln_eps)  # REF overwrites the residual with LN1
        attn_BxTxD = attend(x_BxTxD, p["attn"])
        mlp_in_BxTxD = x_BxTxD + attn_BxTxD
        mlp_BxTxD, hidden_BxTxF = _mlp(mlp_in_BxTxD, p["mlp"], dt)
        out_BxTxD = mlp_in_BxTxD + mlp_BxTxD
    else:
        attn_BxTxD = attend(layer_norm(x_BxTxD, p["ln_1"], cfg.ln_eps), p["attn"])
        x_BxTxD = x_BxTxD + attn_BxTxD
        mlp_in_BxTxD = layer_norm(x_BxTxD, p["ln_2"], cfg.ln_eps)
        mlp_BxTxD, hidden_BxTxF = _mlp(mlp_in_BxTxD, p["mlp"], dt)
        out_BxTxD = x_BxTxD + mlp_BxTxD
    acts.update(attn_out=attn_BxTxD, mlp_in=mlp_in_BxTxD, mlp_hidden=hidden_BxTxF,
                mlp_out=mlp_BxTxD, resid_out=out_BxTxD)
    return out_BxTxD, acts


def unembed(params, cfg: ModelConfig, x_BxTxD):
    """The head on the last block's output: ``ln_f`` then ``lm_head``, [..., D] -> logits [..., V]
    float32 (``apply``'s last step, and a decoder's after its own run of the blocks)."""
    x_BxTxD = layer_norm(x_BxTxD, params["ln_f"], cfg.ln_eps)
    return dense(x_BxTxD, params["lm_head"], jnp.dtype(cfg.dtype))


def apply(params, cfg: ModelConfig, tokens=None, *, embeddings=None, capture: bool = False,
          positions=None, segment_ids=None):
    """Logits [B, T, V] float32 from ``tokens`` [B, T] int or ``embeddings`` [B, T, D] (exactly one).

    ``embeddings`` replace the token-embedding lookup (e.g. ``embed(params, cfg, tokens)``, or soft
    tokens); positions are added here in both cases. With ``capture=True`` returns
    ``(logits, acts)``, acts a dict of ``[L, B, T, ...]`` arrays named as in the module docstring.

    Packed rows (several sequences per row, ``packing.py``): ``positions`` [B, T] int gives each
    slot's position within its own sequence (default ``arange(T)``) and ``segment_ids`` [B, T] int
    which sequence it belongs to; attention stays causal and within one segment, so every sequence
    gets the logits it would get alone (up to float rounding).
    """
    if (tokens is None) == (embeddings is None):
        raise ValueError("pass exactly one of tokens=[B, T] ints or embeddings=[B, T, D]")
    check_params(params, cfg)
    if tokens is not None:
        x_BxTxD = embed(params, cfg, tokens)
    else:
        x_BxTxD = jnp.asarray(embeddings)
        if x_BxTxD.ndim != 3 or x_BxTxD.shape[-1] != cfg.d_model:
            raise ValueError(f"embeddings must be [B, T, d_model={cfg.d_model}], got {x_BxTxD.shape}")
        if x_BxTxD.shape[1] > cfg.seq_len:
            raise ValueError(f"sequence length {x_BxTxD.shape[1]} > cfg.seq_len={cfg.seq_len}")
    T = x_BxTxD.shape[1]
    pos_TxD = position_encoding(params, cfg, T if positions is None else positions)
    x_BxTxD = x_BxTxD.astype(jnp.float32) + pos_TxD
    mask = None if segment_ids is None else attention_mask(T, segment_ids)

    dt = jnp.dtype(cfg.dtype)
    per_layer = []
    for i in range(cfg.n_layer):
        x_BxTxD, acts = block(x_BxTxD, params[f"h_{i}"], cfg, dt, mask=mask)
        if capture:
            per_layer.append(acts)
    logits_BxTxV = unembed(params, cfg, x_BxTxD)
    if not capture:
        return logits_BxTxV
    return logits_BxTxV, {n: jnp.stack([a[n] for a in per_layer]) for n in ACT_NAMES}

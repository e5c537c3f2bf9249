"""A plain Flax GPT-2 training step of a given size: the yardstick for ``train_step.py --baseline``.

What a newcomer would write first: ``flax.linen`` pre-norm blocks with one fused q|k|v ``nn.Dense``,
einsum attention with a masked ``softmax``, ``nn.Dense`` MLP with tanh-GELU, learned positions,
``optax.adamw`` and ``optax.softmax_cross_entropy_with_integer_labels`` on random tokens, the
whole step jitted and donated. Same parameter count (up to the position table) and FLOPs as the
project's model at the same size. The issue states that the authors' PyTorch release runs ~1.9x
slower than such a step on the 2-core VM (with the default allocator); timing both steps in one process
under the same load gives a ratio that the machine's load does not move. Note that in
``train_step.py`` this step also runs with ``host_memory.keep_freed_memory`` unless
``--default_malloc`` is given.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class _Block(nn.Module):
    d_model: int
    n_head: int
    d_mlp: int

    @nn.compact
    def __call__(self, x):
        B, T, D = x.shape
        H, K = self.n_head, self.d_model // self.n_head
        q, k, v = jnp.split(nn.Dense(3 * D)(nn.LayerNorm()(x)), 3, axis=-1)
        q, k, v = (t.reshape(B, T, H, K) for t in (q, k, v))
        s = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(K)
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -1e9)
        y = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, axis=-1), v).reshape(B, T, D)
        x = x + nn.Dense(D)(y)
        h = jax.nn.gelu(nn.Dense(self.d_mlp)(nn.LayerNorm()(x)), approximate=True)
        return x + nn.Dense(D)(h)


class PlainGPT(nn.Module):
    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    d_mlp: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab_size, self.d_model)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (self.seq_len, self.d_model))[:tokens.shape[1]]
        for _ in range(self.n_layer):
            x = _Block(self.d_model, self.n_head, self.d_mlp)(x)
        return nn.Dense(self.vocab_size, use_bias=False)(nn.LayerNorm()(x))


def make_step(model_cfg, batch: int):
    """``(step, state)``: ``step(state) -> (state, loss)`` trains the plain GPT on one fixed random batch
    of ``batch x model_cfg.seq_len`` tokens (the data does not change the cost)."""
    net = PlainGPT(model_cfg.vocab_size, model_cfg.seq_len, model_cfg.n_layer, model_cfg.n_head,
                   model_cfg.d_model, model_cfg.d_mlp)
    tokens = jax.random.randint(jax.random.key(1), (batch, model_cfg.seq_len), 0, model_cfg.vocab_size)
    params = net.init(jax.random.key(0), tokens[:, :-1])
    opt = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=1e-4)

    def loss_fn(p):
        logits = net.apply(p, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(state):
        p, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = opt.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0), (params, opt.init(params))

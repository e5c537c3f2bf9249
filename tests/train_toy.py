"""A toy training setup shared by the train / checkpoint / sharding tests: a 1-layer model and a
learnable stand-in sampler (counting sequences), so the tests exercise the step and the loop without
compiling the real data sampler (tens of seconds on a small CPU)."""
import functools

import jax
import jax.numpy as jnp

from safety_mech import grammar as gr
from safety_mech import losses
from safety_mech import model as model_lib
from safety_mech import train

T = 16
BATCH = 8
MODEL = model_lib.ModelConfig(vocab_size=gr.VOCAB_SIZE, seq_len=T, n_layer=1, n_head=2, d_model=16, d_mlp=32)
LOSS = losses.LossConfig(MODEL)
OPT = train.OptConfig(lr=1e-2, min_lr=1e-4, warmup_steps=2, decay_end_step=20)


def sample_counting(key, step, batch_size=BATCH):
    """Letters counting up mod 30 from a random start; BOS first; every letter after the first is a
    target (the first is unpredictable)."""
    del step
    start = jax.random.randint(key, (batch_size, 1), 0, gr.N_LETTERS)
    letters = (start + jnp.arange(T - 1)) % gr.N_LETTERS + gr.LETTER0
    tokens = jnp.concatenate([jnp.full((batch_size, 1), gr.BOS), letters], axis=1).astype(jnp.int32)
    mask = jnp.broadcast_to(jnp.arange(T) >= 2, (batch_size, T))
    return {"tokens": tokens, "loss_mask": mask}


OPTIMIZER = train.make_optimizer(OPT)


def _init_params(key):
    return model_lib.init_params(key, MODEL)


@jax.jit
def init_state(key, lr=OPT.lr):
    """One replica's fresh state straight from ``key`` (compiled once per test session)."""
    return train.init_state_from_key(key, _init_params, OPTIMIZER, lr)


def init_replicas(key, lrs):
    return train.init_replicas(key, len(lrs), _init_params, OPTIMIZER, lrs)


def make_step(n_replicas=1, mesh=None, sample_fn=sample_counting, loss_fn=losses.lm_loss):
    return train.make_train_step(loss_fn, OPTIMIZER, sample_fn, LOSS, n_replicas=n_replicas, mesh=mesh,
                                 lr_fn=train.make_lr_fn(OPT))


@functools.cache
def shared_step(n_replicas=1, mesh=None):
    """The toy step, compiled once per test session and shared by the test files."""
    return make_step(n_replicas=n_replicas, mesh=mesh)


def tree_equal(a, b) -> bool:
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

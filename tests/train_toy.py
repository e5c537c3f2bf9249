"""A toy training setup shared by the train / checkpoint / sharding / packing tests: a 1-layer model
and a learnable stand-in sampler (counting sequences), so the tests exercise the step and the loop
without compiling the real data sampler (tens of seconds on a small CPU).

States carry the replica axis [R] as every run's do (``replicas.py``); :func:`init_state` is one
replica (R = 1) straight from a key."""
import functools

import jax
import jax.numpy as jnp

from safety_mech import grammar as gr
from safety_mech import losses, optim, train
from safety_mech import model as model_lib

T = 16
BATCH = 8
MODEL = model_lib.ModelConfig(vocab_size=gr.VOCAB_SIZE, seq_len=T, n_layer=1, n_head=2, d_model=16, d_mlp=32)
LOSS = losses.LossConfig(MODEL)
OPT = optim.OptConfig(lrs=(1e-2,), min_lr=1e-4, warmup_steps=2, decay_end_step=20)
LR = OPT.lrs[0]


def sample_counting(key, step, batch_size=BATCH):
    """Letters counting up mod 30 from a random start; BOS first; every letter after the first is a
    target (the first is unpredictable)."""
    del step
    start = jax.random.randint(key, (batch_size, 1), 0, gr.N_LETTERS)
    letters = (start + jnp.arange(T - 1)) % gr.N_LETTERS + gr.LETTER0
    tokens = jnp.concatenate([jnp.full((batch_size, 1), gr.BOS), letters], axis=1).astype(jnp.int32)
    mask = jnp.broadcast_to(jnp.arange(T) >= 2, (batch_size, T))
    return {"tokens": tokens, "loss_mask": mask}


OPTIMIZER = optim.make_optimizer(OPT)


def init_params(key):
    return model_lib.init_params(key, MODEL)


@jax.jit
def _init_one(key, lr):
    state = train.init_state_from_key(key, init_params, OPTIMIZER, lr)
    return jax.tree.map(lambda x: x[None], state)


def init_state(key, lr=LR):
    """One replica's fresh state [1, ...] straight from ``key`` (compiled once per pytest process)."""
    return _init_one(key, jnp.float32(lr))


def init_replicas(lrs, seeds):
    """The [R]-stacked state of ``replicas.grid(lrs, seeds)`` (``train.init_replicas``)."""
    return train.init_replicas(lrs, seeds, init_params, OPTIMIZER)


def make_step(mesh=None, sample_fn=sample_counting, loss_fn=losses.lm_loss):
    return train.make_train_step(loss_fn, OPTIMIZER, sample_fn, LOSS, mesh=mesh, lr_fn=optim.make_lr_fn(OPT))


@functools.cache
def shared_step(mesh=None):
    """The toy step, shared by the test files (it compiles once per replica count and mesh)."""
    return make_step(mesh=mesh)


def tree_equal(a, b) -> bool:
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

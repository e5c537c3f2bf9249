"""Helpers of the sampler tests (test_data.py, test_safety_data.py): batches as per-example rows of
readable token strings, and large samples drawn at one compiled batch size."""
import jax
import numpy as np

import reference as ref
from safety_mech import grammar as gr


def many(sampler, key, n, cfg, batch_size, *args):
    """n examples from repeated calls of a batch sampler at ``batch_size`` (no recompilation)."""
    parts = [sampler(k, cfg, batch_size, *args) for k in jax.random.split(key, -(-n // batch_size))]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def rows(batch):
    """Batch dict -> list of per-example dicts of numpy values."""
    batch = {k: np.asarray(v) for k, v in batch.items()}
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def strings(tokens):
    return [gr.VOCAB[int(t)] for t in tokens]


def text_of(ex):
    return [ref.LETTERS[x] for x in ex["text"][: ex["text_len"]]]


def ops_of(ex):
    return strings(ex["ops"])


def branch_of(ex):
    return gr.BRANCH_NAMES[int(ex["branch"])]

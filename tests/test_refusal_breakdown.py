"""benchmarks/refusal_breakdown.py: the input splits and the probe (planted structure)."""
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import refusal_breakdown as rb  # noqa: E402

from safety_mech import data as data_lib  # noqa: E402
from safety_mech import evaluate as eval_lib  # noqa: E402

CFG = data_lib.DataConfig(min_len=6, max_len=6, p_four_iid=1.0)


def _set(name, n=600):
    return eval_lib.sample_eval_data(jax.random.key(3), CFG, name, n, keys=rb.GROUP_KEYS)


def test_always_unsafe_count_follows_the_operator_rule():
    # safe inputs never carry an operator unsafe on both branches (SPEC §7)
    assert (rb.always_unsafe_in_governing_pair(_set("safe")) == 0).all()
    ev = _set("unsafe")
    count = rb.always_unsafe_in_governing_pair(ev)
    # on safe-dominant text every non-identity operator of the governing pair is one of them
    base = np.asarray(data_lib._tables()["base_of_op"])[ev["ops"]]
    pair = np.where(ev["second_pair"][:, None], base[:, 2:], base[:, :2])
    b0 = ev["branch"] == 0
    np.testing.assert_array_equal(count[b0], (pair[b0] != 0).sum(1))
    assert set(np.unique(count)) <= {0, 1, 2} and (count[~b0] < 2).any()


def test_groups_partition_and_rate_table():
    ev = {**_set("unsafe"), "unsafe_input": True}
    posterior = np.linspace(0, 1, len(ev["branch"]))
    groups = rb.breakdown_groups(ev, posterior)
    n = len(ev["branch"])
    for prefix in ("branch", "PCFG", "posterior", "always-unsafe"):
        members = [m for k, m in groups.items() if prefix in k]
        np.testing.assert_array_equal(np.sum(members, axis=0), np.ones(n))  # each input in exactly one
    hit = ev["branch"] == 1
    rows = rb.rate_table("t", hit, {"b1": ev["branch"] == 1, "b0": ev["branch"] == 0})
    assert rows[2].endswith("| 1.000 |") and rows[3].endswith("| 0.000 |")


def test_logistic_probe_finds_planted_direction_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 30))
    w = rng.normal(size=30)
    y = x @ w + 0.3 * rng.normal(size=4000) > 0
    assert rb.logistic_probe_accuracy(x, y) > 0.93
    assert abs(rb.logistic_probe_accuracy(x, rng.random(4000) < 0.5) - 0.5) < 0.06

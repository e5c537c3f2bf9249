"""safety_mech.host_memory: with it, XLA's large per-run scratch buffer is reused without page faults.

Each case runs in a fresh process: the setting has to be made before JAX starts its thread pools.
"""
import json
import os
import subprocess
import sys

import pytest

from safety_mech import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function whose temporaries (two 100 MB matrices, each times a vector) are far above
# glibc's per-thread arena size; minor page faults of each of 12 calls after 10 warm-up calls. With
# the setting the heap first grows for a few calls (a freed block is often just too small for the
# next request with its alignment padding, so it goes above it) and then nearly every call faults
# nothing; an occasional call still gets fresh pages, so the test compares medians.
SCRIPT = r"""
import json, resource, sys
from safety_mech import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(x[:, None] * x[None, :]) @ (jnp.cos(x[:, None] - x[None, :]) @ x))
x = jnp.linspace(0.0, 1.0, 5000, dtype=jnp.float32)
for _ in range(10):
    jax.block_until_ready(f(x))
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "median_faults": sorted(faults)[len(faults) // 2]}))
"""


def _faults(mode: str, extra_env=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV_SWITCH}
    env.update(JAX_PLATFORMS="cpu", **(extra_env or {}))
    env["XLA_FLAGS"] = ""  # one plain CPU device; no fake devices needed here
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, env=env, capture_output=True,
                         check=False, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_scratch_memory_is_reused_without_page_faults():
    default = _faults("default")
    kept = _faults("keep")
    assert kept["applied"] is True
    # 100 MB of fresh pages is ~25,000 faults; the default allocator pays that on every call.
    assert default["median_faults"] > 20_000, default
    assert kept["median_faults"] < 0.05 * default["median_faults"], (kept, default)


def test_env_switch_turns_it_off():
    out = _faults("keep", {host_memory.ENV_SWITCH: "0"})
    assert out["applied"] is False

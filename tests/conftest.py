"""Test setup, before jax is imported anywhere (DESIGN.md):

* 4 fake CPU devices, for the data-parallel tests;
* XLA backend optimisation level 0: the suite is dominated by compiling many small programs, and
  level 0 compiles them ~3x faster (runtime is slower, which these tiny programs do not notice).
  Semantics are unchanged; benchmarks never run under this file.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _flag in ("--xla_force_host_platform_device_count=4", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

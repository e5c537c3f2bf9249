"""What every launcher shares: one-line errors for bad flags, bad configs and bad run directories,
a non-zero exit, and nothing written.

A launcher is flags -> one library call (``study.py``); :func:`main` wraps that call.
"""
from __future__ import annotations

import importlib
import logging as std_logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from safety_mech import checkpoint as ckpt_lib
from safety_mech import host_memory, setups
from safety_mech.runs import RunError
from safety_mech.train import NonFiniteLossError


class ConfigFlag:
    """The ``--config`` flag (a ``configs/`` file and preset, e.g. ``configs/reproduce.py:paper``, with
    ``--config.<key>=`` overrides); without it, ``value`` is ``configs.<module>.get_config(preset)``
    (overrides then need the config named)."""

    def __init__(self, default: tuple[str, str] | None, example: str):
        self._flag = config_flags.DEFINE_config_file("config", None, f"config file and preset, e.g. {example}",
                                                     lock_config=True)
        self._default = default

    @property
    def value(self):
        if self._flag.value is None and self._default is not None:
            module, preset = self._default
            return importlib.import_module(f"configs.{module}").get_config(preset)
        return self._flag.value


# The errors a launcher reports as one line and a non-zero exit.
USER_ERRORS = (setups.ConfigError, RunError, ckpt_lib.CheckpointError, NonFiniteLossError)


def parse_flags(argv):
    """absl flag parsing with bad flags and bad ``--config.*`` overrides reported in one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = str(e).strip()
        if "Traceback (most recent call last)" in text:  # an exception inside the config file
            sys.exit(f"error: --config: {text.splitlines()[-1]}")
        sys.exit(f"error: {' '.join(text.split())}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # config_flags: unknown key / bad override
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config.")) or "--config"
        sys.exit(f"error: cannot apply {overrides}: {type(e).__name__} {' '.join(str(e).split())}")


class QuietOrbax(std_logging.Filter):
    """Orbax logs every save step by step at INFO; keep its warnings only."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv, required: Sequence[str], run_fn: Callable[[], Any]) -> None:
    """A launcher's ``main``: no positional arguments, the ``required`` flags set, then ``run_fn()``
    with its errors (:data:`USER_ERRORS`) as one line and a non-zero exit."""
    host_memory.keep_freed_memory()  # before the first computation: see host_memory.py
    logging.get_absl_handler().addFilter(QuietOrbax())
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    missing = [f"--{name}" for name in required if flags.FLAGS[name].value in (None, "", [])]
    if missing:
        sys.exit(f"error: {', '.join(missing)} required")
    try:
        run_fn()
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")

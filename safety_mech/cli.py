"""What every launcher shares: one-line errors for bad flags, bad configs, bad run directories and
directories that cannot be written, a non-zero exit, and nothing written.

A launcher is flags -> one library call (``study.py``); :func:`main` wraps that call.
"""
from __future__ import annotations

import errno
import importlib
import logging as std_logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags, logging
from ml_collections import ConfigDict, config_flags

from safety_mech import checkpoint as ckpt_lib
from safety_mech import convert, grammar, host_memory, setups
from safety_mech.analysis import realmodels
from safety_mech.runs import RunError
from safety_mech.train import NonFiniteLossError, TimeBudgetReached


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


PAUSED_EXIT = 75  # exit status of a run that paused at its --max_minutes budget (EX_TEMPFAIL)
RESERVE_S = 30.0  # of a --max_minutes budget: the last step, the checkpoint and the exit


def DEFINE_max_minutes():  # noqa: N802 (absl's naming)
    """The ``--max_minutes`` flag of the training launchers (see :func:`deadline`)."""
    return flags.DEFINE_float("max_minutes", 0, "pause after this many minutes with a checkpoint and exit with "
                              f"status {PAUSED_EXIT}; the same command continues (0: no budget)")


def deadline(max_minutes: float) -> float | None:
    """The ``time.monotonic()`` at which a launcher given ``--max_minutes`` pauses its work, so that
    the process ends within the budget; None for 0 (no budget)."""
    if max_minutes < 0:
        sys.exit(f"error: --max_minutes must be >= 0 (0: no budget), got {max_minutes:g}")
    if not max_minutes:
        return None
    if max_minutes * 60 <= 2 * RESERVE_S:
        sys.exit(f"error: --max_minutes {max_minutes:g} leaves no time to work; give at least {2 * RESERVE_S / 60:g}")
    return time.monotonic() + max_minutes * 60 - RESERVE_S


# The errors a launcher reports as one line and a non-zero exit.
USER_ERRORS = (setups.ConfigError, RunError, ckpt_lib.CheckpointError, NonFiniteLossError, grammar.GrammarError,
               convert.ConvertError, realmodels.CheckpointPairError)
# OSError numbers of a directory that cannot be written: reported as one line, not a traceback
WRITE_ERRNOS = {errno.EACCES: "make it writable", errno.EPERM: "make it writable", errno.EROFS: "make it writable",
                errno.ENOSPC: "free space", errno.EDQUOT: "free space"}


def _unknown_key(argv) -> str | None:
    """For a ``--config.<key>`` override naming a key the config lacks: which override, which key and
    the nearest existing one; None when the config cannot be loaded or every key exists."""
    args = list(argv[1:])
    paths = [a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else None)
             for i, a in enumerate(args) if a.split("=", 1)[0] == "--config"]
    try:
        config = flags.FLAGS["config"].parser.parse(paths[-1])
    except Exception:  # noqa: BLE001 (no --config, or its own error: the generic message)
        return None
    for arg in args:
        if not arg.startswith("--config."):
            continue
        missing = setups.missing_key(config, arg.split("=", 1)[0][len("--config."):].split("."))
        if missing:
            above, part, hint = missing
            group = ".".join(["config"] + above)
            node = config
            for p in above:
                node = node[p]
            return f"{arg}: {group} has no key {part!r}; " + (
                f"did you mean {group}.{hint}?" if hint else
                f"its keys: {', '.join(node.keys())}" if isinstance(node, ConfigDict) else "it is not a group")
    return None


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
        if isinstance(e, (AttributeError, KeyError)) and (message := _unknown_key(argv)):
            sys.exit(f"error: {message}")
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config.")) or "--config"
        sys.exit(f"error: cannot apply {overrides}: {type(e).__name__} {' '.join(str(e).split())}")


class QuietOrbax(std_logging.Filter):
    """Orbax logs every save step by step at INFO; keep its warnings only."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv, required: Sequence[str], run_fn: Callable[[], Any]) -> None:
    """A launcher's ``main``: no positional arguments, the ``required`` flags set, then ``run_fn()``
    with its errors (:data:`USER_ERRORS`, and a directory it cannot write: :data:`WRITE_ERRNOS`) as
    one line and a non-zero exit; a run that paused at its budget exits with :data:`PAUSED_EXIT`."""
    host_memory.keep_freed_memory()  # before the first computation: see host_memory.py
    logging.get_absl_handler().addFilter(QuietOrbax())
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    missing = [f"--{name}" for name in required if flags.FLAGS[name].value in (None, "", [])]
    if missing:
        sys.exit(f"error: {', '.join(missing)} required")
    try:
        run_fn()
    except TimeBudgetReached as e:
        print(f"paused: {e}; the same command continues", file=sys.stderr)
        sys.exit(PAUSED_EXIT)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename else ""
        sys.exit(f"error: cannot write{where}: {e.strerror}; {WRITE_ERRNOS[e.errno]} or choose another directory")

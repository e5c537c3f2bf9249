"""Pretrained base runs shipped with the package, so the default study needs no pretraining stage.

Each base is an ordinary pretraining run directory (``config.json``, ``metrics.jsonl``, the final
checkpoint) made by the project's own command, written in its ``README.md``, with a ``SHA256SUMS``
manifest of every file: :func:`path` verifies it before handing the directory out, so a corrupt or
partial copy is a one-line error instead of a silently different study.
"""
from __future__ import annotations

import os

from safety_mech import files
from safety_mech.runs import RunError

MANIFEST = files.MANIFEST


def names() -> list[str]:
    """The shipped bases."""
    here = os.path.dirname(__file__)
    return sorted(d for d in os.listdir(here) if os.path.isfile(os.path.join(here, d, MANIFEST)))


def write_manifest(root: str) -> str:
    """Write ``root/SHA256SUMS`` for every file under ``root`` (used once, when a base is added)."""
    return files.write_manifest(root)


def path(name: str) -> str:
    """The run directory of shipped base ``name``, its files checked against its manifest."""
    root = os.path.join(os.path.dirname(__file__), name)
    if not os.path.isfile(os.path.join(root, MANIFEST)):
        raise RunError(f"no shipped base {name!r}; the package has {names()}")
    problem = files.check_manifest(root, allow_extra=("README.md",))
    if problem:
        raise RunError(f"shipped base {name!r} at {root}: {problem} (corrupt or partial); reinstall the package")
    return root

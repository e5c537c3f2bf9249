"""Pretrained base runs shipped with the package, so the default study needs no pretraining stage.

Each base is an ordinary pretraining run directory (``config.json``, ``metrics.jsonl``, the final
checkpoint) made by the project's own command, written in its ``README.md``, with a ``SHA256SUMS``
manifest of every file: :func:`path` verifies it before handing the directory out, so a corrupt or
partial copy is a one-line error instead of a silently different study.
"""
from __future__ import annotations

import hashlib
import os

from safety_mech.runs import RunError

MANIFEST = "SHA256SUMS"


def names() -> list[str]:
    """The shipped bases."""
    here = os.path.dirname(__file__)
    return sorted(d for d in os.listdir(here) if os.path.isfile(os.path.join(here, d, MANIFEST)))


def _files(root: str) -> list[str]:
    out = []
    for d, _, fs in os.walk(root):
        out += [os.path.relpath(os.path.join(d, f), root) for f in fs if f != MANIFEST]
    return sorted(out)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(root: str) -> str:
    """Write ``root/SHA256SUMS`` for every file under ``root`` (used once, when a base is added)."""
    lines = [f"{_sha256(os.path.join(root, f))}  {f}\n" for f in _files(root)]
    path = os.path.join(root, MANIFEST)
    with open(path, "w") as f:
        f.writelines(lines)
    return path


def path(name: str) -> str:
    """The run directory of shipped base ``name``, its files checked against its manifest."""
    root = os.path.join(os.path.dirname(__file__), name)
    manifest = os.path.join(root, MANIFEST)
    if not os.path.isfile(manifest):
        raise RunError(f"no shipped base {name!r}; the package has {names()}")
    with open(manifest) as f:
        expected = dict(reversed(line.rstrip("\n").split("  ", 1)) for line in f if line.strip())
    found = _files(root)
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected) - {"README.md"})
    if missing or extra:
        raise RunError(f"shipped base {name!r} at {root}: files {'missing ' + str(missing) if missing else ''}"
                       f"{' unexpected ' + str(extra) if extra else ''}; reinstall the package")
    for rel, digest in expected.items():
        if _sha256(os.path.join(root, rel)) != digest:
            raise RunError(f"shipped base {name!r}: {rel} does not match its checksum (corrupt); reinstall the package")
    return root

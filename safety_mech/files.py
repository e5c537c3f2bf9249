"""The files of a run directory: JSON lines of metrics, atomic writes, JSON sanitising.

Every file a later stage reads is written atomically (to a temporary name in the same directory,
then ``os.replace``), so a killed process leaves either the old file or the new one, never half.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile

import jax
import numpy as np


def to_jsonable(value):
    """Scalars -> float/int, arrays -> (nested) lists, so metrics dicts serialise as JSON."""
    arr = np.asarray(value)
    if arr.dtype == bool:
        return arr.tolist()
    if arr.ndim == 0:
        return int(arr) if np.issubdtype(arr.dtype, np.integer) else float(arr)
    return arr.tolist()


def sanitize(x, path: str = "", bad: list | None = None):
    """Plain JSON types (dicts, lists, str, bool, int, float); non-finite floats become None and
    their paths are appended to ``bad``."""
    if isinstance(x, dict):
        return {str(k): sanitize(v, f"{path}/{k}", bad) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [sanitize(v, f"{path}[{i}]", bad) for i, v in enumerate(x)]
    if isinstance(x, np.ndarray):
        return sanitize(x.tolist(), path, bad)
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(float(x)):
            if bad is not None:
                bad.append(path)
            return None
        return float(x)
    return x


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


MANIFEST = "SHA256SUMS"  # "<sha256>  <relative path>" per file of a directory


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_files(root: str) -> list[str]:
    """Every file under ``root`` (relative paths, sorted), manifests excepted."""
    out = []
    for d, _, fs in os.walk(root):
        out += [os.path.relpath(os.path.join(d, f), root) for f in fs if f != MANIFEST]
    return sorted(out)


def write_manifest(root: str) -> str:
    """Write ``root/SHA256SUMS`` (atomically) for every file under ``root``."""
    path = os.path.join(root, MANIFEST)
    write_text(path, "".join(f"{sha256(os.path.join(root, f))}  {f}\n" for f in manifest_files(root)))
    return path


def check_manifest(root: str, allow_extra: tuple = ()) -> str | None:
    """None when every file under ``root`` matches ``root/SHA256SUMS``, else what does not (one line):
    no manifest, missing or unexpected files (except ``allow_extra``), or the first file whose
    digest differs."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return f"no {MANIFEST}"
    with open(path, errors="replace") as f:
        rows = [line.rstrip("\n").split("  ", 1) for line in f if line.strip()]
    if not all(len(r) == 2 and len(r[0]) == 64 for r in rows):
        return f"{MANIFEST} is not a manifest"
    expected = {rel: digest for digest, rel in rows}
    found = manifest_files(root)
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected) - set(allow_extra))
    if missing or extra:
        return (f"missing files {missing}" if missing else "") + (" " if missing and extra else "") + \
            (f"unexpected files {extra}" if extra else "")
    for rel, digest in expected.items():
        if sha256(os.path.join(root, rel)) != digest:
            return f"{rel} does not match its checksum"
    return None


def write_json(path: str, obj, indent: int | None = 1, sort_keys: bool = False) -> None:
    """``obj`` as JSON at ``path``, atomically (NaN/inf rejected: sanitise first)."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_npz(path: str, arrays: dict) -> None:
    """``np.savez`` at ``path``, atomically."""
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended as training goes. ``path=None`` (or
    any process but 0 of a multi-host run when writing) writes nothing. With ``tensorboard``
    (a :class:`TensorBoardMirror`) every numeric value is also written as a TensorBoard scalar;
    metrics.jsonl stays the record every stage reads."""

    def __init__(self, path: str | None, tensorboard: "TensorBoardMirror | None" = None):
        self.path = path
        self.tensorboard = tensorboard

    def _writer(self) -> bool:
        return self.path is not None and jax.process_index() == 0

    def write(self, record: dict) -> None:
        if not self._writer():
            return
        line = json.dumps({k: to_jsonable(v) for k, v in record.items()})
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def records(self) -> list[dict]:
        """Every complete line (a line cut short by a kill is skipped)."""
        if self.path is None or not os.path.exists(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def final(self) -> dict:
        """The last record marked ``"final": true``, or {}."""
        finals = [r for r in self.records() if r.get("final")]
        return finals[-1] if finals else {}

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (and final records): on resume from a checkpoint at
        ``step``, what the killed run wrote past it is replayed."""
        if not self._writer() or not os.path.exists(self.path):
            return
        keep = [r for r in self.records() if r.get("step", 0) <= step and not r.get("final")]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


class TensorBoardMirror:
    """TensorBoard event files of a run's metrics, one sub-directory per replica
    (``<logdir>/<replica name>``, so TensorBoard overlays the replicas), written with tensorboardX
    (the optional ``tensorboard`` extra). :meth:`open` returns None when tensorboardX is not
    installed. A resumed run purges the events after its restart step."""

    def __init__(self, writers: list):
        self.writers = writers

    @classmethod
    def open(cls, logdir: str, replica_names, start_step: int = 0) -> "TensorBoardMirror | None":
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return None
        purge = start_step + 1 if start_step else None
        return cls([SummaryWriter(os.path.join(logdir, name.replace("/", "_")), purge_step=purge, flush_secs=30)
                    for name in replica_names])

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key in ("step", "final") or isinstance(value, (bool, str)) or value is None:
                continue
            arr = np.asarray(value, np.float64).ravel()
            if arr.size == 1:  # shared by every replica (e.g. time/step_s)
                arr = np.repeat(arr, len(self.writers))
            if arr.size != len(self.writers):
                continue  # not a per-replica scalar
            for writer, v in zip(self.writers, arr):
                if math.isfinite(v):
                    writer.add_scalar(key, float(v), step)
        if record.get("final"):
            self.close()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

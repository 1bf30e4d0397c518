"""Checkpoints that load without unpickling, written atomically, verified by a checksum.

A checkpoint is two files in ``<run_dir>/checkpoints/``: ``step_<N>.npz`` (every array, by name)
and ``step_<N>.json`` (counters, RNG states, the npz's SHA-256 and size). Each is written to a
temporary file, fsynced and renamed; the JSON goes last and marks the checkpoint complete. Loading
verifies the checksum; a corrupt or truncated checkpoint is reported, renamed ``*.corrupt`` (never
silently overwritten) and the previous good one is used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from sparserl.sparsity import leaf_name

FORMAT = 1


class CheckpointError(RuntimeError):
    pass


def is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def _free_bytes(path: Path) -> int | None:
    for p in [path, *path.parents]:
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


class DiskFull(RuntimeError):
    """The disk filled up while a run wrote its files; what was written before (the previous
    checkpoint included) is intact and the run resumes once there is space."""

    @classmethod
    def of(cls, e: OSError, need: int | None = None) -> "DiskFull":
        path = Path(e.filename) if e.filename else None
        free = _free_bytes(path) if path else None
        size = (f"needs about {_mb(need)}" if need else "needs more space") + (f", {_mb(free)} free" if free is not None
                                                                              else "")
        where = str(path) if path else "a run file"
        return cls(f"no space left on the device writing {where} ({size}); the previous checkpoint is kept: "
                   f"free some space and rerun the same command to resume")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, a kill signal: no half-written temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def flatten_tree(tree, prefix: str) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {f"{prefix}/{leaf_name(path)}": np.asarray(leaf) for path, leaf in leaves}


def unflatten_like(template, arrays: dict[str, np.ndarray], prefix: str):
    """Rebuild a pytree shaped like ``template`` from arrays saved by :func:`flatten_tree`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for path, leaf in leaves:
        key = f"{prefix}/{leaf_name(path)}"
        if key not in arrays:
            raise CheckpointError(f"checkpoint lacks {key}")
        value = arrays[key]
        if tuple(value.shape) != tuple(np.shape(leaf)):
            raise CheckpointError(f"{key}: checkpoint shape {value.shape} != model shape {np.shape(leaf)}")
        out.append(value)
    return jax.tree_util.tree_unflatten(treedef, out)


def save(directory: Path, step: int, arrays: dict[str, np.ndarray], meta: dict[str, Any], keep: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.tmp"):  # left by a kill during an earlier write
        stale.unlink()
    npz = directory / f"step_{step:010d}.npz"
    try:
        _write_atomic(npz, lambda f: np.savez(f, **arrays))
        meta = {**meta, "format": FORMAT, "step": step, "npz_sha256": _sha256(npz), "npz_bytes": npz.stat().st_size}
        _write_atomic(directory / f"step_{step:010d}.json", lambda f: f.write(json.dumps(meta)), mode="w")
    except OSError as e:
        if not is_disk_full(e):
            raise
        npz.unlink(missing_ok=True)  # no JSON marker was written: this checkpoint never existed
        if e.filename is None:
            e.filename = str(npz)
        raise DiskFull.of(e, sum(a.nbytes for a in arrays.values()) + (1 << 16)) from None
    for old in complete_steps(directory)[:-keep]:
        for suffix in (".npz", ".json"):
            (directory / f"step_{old:010d}{suffix}").unlink(missing_ok=True)
    return npz


def complete_steps(directory: Path) -> list[int]:
    """Steps with a JSON marker, oldest first (validity is checked on load)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.stem.split("_")[1]) for p in directory.glob("step_*.json"))


def load(directory: Path, step: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    npz, marker = directory / f"step_{step:010d}.npz", directory / f"step_{step:010d}.json"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{marker}: unreadable ({e})") from None
    if not npz.is_file():
        raise CheckpointError(f"{npz}: missing")
    if npz.stat().st_size != meta.get("npz_bytes") or _sha256(npz) != meta.get("npz_sha256"):
        raise CheckpointError(f"{npz}: checksum mismatch (corrupt or truncated)")
    with np.load(npz, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, meta


def quarantine(directory: Path, step: int) -> None:
    """Move a bad checkpoint aside so that nothing later overwrites it silently."""
    for suffix in (".npz", ".json"):
        p = directory / f"step_{step:010d}{suffix}"
        if p.exists():
            os.replace(p, p.with_name(p.name + ".corrupt"))


def latest_valid(directory: Path, at_most: int | None = None, log: Callable[[str], None] = print):
    """The newest loadable checkpoint (with step <= ``at_most``), falling back past corrupt ones."""
    for step in reversed(complete_steps(directory)):
        if at_most is not None and step > at_most:
            continue
        try:
            return load(directory, step)
        except CheckpointError as e:
            log(f"warning: {e}; trying the previous checkpoint")
            quarantine(directory, step)
    return None

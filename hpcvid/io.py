"""Atomic files: the ground floor every part of hpcvid writes through (stdlib only).

A file is written under a temporary name in its own folder, fsynced and renamed over the target, and the folder is
fsynced: a reader (or a rerun after a crash) sees the old file or the whole new one, never half of one. Temporary
names start with '.' and end in '.tmp' (before the suffix, when the writer needs it to pick a format), and carry the
host and pid, so two writers never share one and a cleaner can tell whose leftovers they are.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from pathlib import Path
from typing import Any, Callable, Optional


def temporary_path(path: Path, keep_suffix: bool = False) -> Path:
    """Where to write `path` first. keep_suffix: end with the target's suffix (e.g. for an encoder that picks the
    container format from it)."""
    path = Path(path)
    tail = f".tmp{path.suffix}" if keep_suffix else ".tmp"
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}{tail}")


def commit(tmp: Path, path: Path) -> int:
    """fsync a finished temporary file, rename it over `path`, fsync the folder; returns the size in bytes."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)
    return Path(path).stat().st_size


def atomic_write_with(path: Path, write: Callable[[Path], Any], keep_suffix: bool = False,
                      before_commit: Optional[Callable[[Path], Any]] = None) -> int:
    """Write `path` through `write(tmp)` (a library call that writes a file), then commit; the temporary file never
    outlives a failure. before_commit(tmp) may read the finished file (e.g. to hash it) before it is renamed."""
    path = Path(path)
    tmp = temporary_path(path, keep_suffix)
    try:
        write(tmp)
        if before_commit is not None:
            before_commit(tmp)
        return commit(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: Path, data: Any) -> None:
    """Indented, sorted, strict JSON: NaN and inf (which JSON has not) are written as null."""
    atomic_write_bytes(path, (json.dumps(strict_json(data), indent=1, sort_keys=True, allow_nan=False) + "\n").encode())


def strict_json(data: Any) -> Any:
    """`data` with every non-finite float replaced by None, so json.dumps(allow_nan=False) accepts it."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json(path: Path) -> Optional[Any]:
    """The parsed file, or None when it is absent or unreadable (a torn write counts as absent)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None

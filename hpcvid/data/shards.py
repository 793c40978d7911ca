"""HDF5 latent shards: atomic writing, completion markers, the dataset index, and a validated reader.

A dataset folder holds (format documented in docs/shard_format.md):
    dataset.json              identity: the spec parts that determine the content, fixed on first run
    shard-00000.h5            clips of manifest rows [0, R), grouped by bucket
    shard-00000.json          completion marker + stats + failures of that shard, written LAST
    index.json                summary over all complete shards (rebuilt by every worker when it finishes)
    failures.jsonl            every failed row of every complete shard, one JSON object a line

A shard counts as done only when its marker exists and the .h5 beside it has the size the marker records; anything
else (a temporary file, a shard without marker) is redone, so a crash at any point loses no more than the shard in
flight and a rerun never duplicates a clip.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import h5py
import numpy as np

import hpcvid
from hpcvid.config import UserError

SHARD_FORMAT = "hpcvid-shard"
FORMAT_VERSION = 1
STR = h5py.string_dtype(encoding="utf-8")
PER_CLIP_FIELDS = ("clip_id", "video_id", "caption", "row", "start_frame", "stride", "fps")


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def clip_id(video_id: str, start_frame: int) -> str:
    return f"{video_id}@{start_frame}"


# ---------------------------------------------------------------------------------------------------- atomic I/O

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temporary name in the same folder, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json(path: Path) -> Optional[Any]:
    """The parsed file, or None when it is absent or unreadable (a torn write counts as absent)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------- writing

@dataclass
class ClipRecord:
    """What is stored beside each clip's latent."""
    video_id: str
    caption: str
    row: int
    start_frame: int
    stride: int
    fps: float


class ShardWriter:
    """Appends encoded clips to one shard under a temporary name; `commit()` makes it visible atomically."""

    def __init__(self, path: Path, attrs: dict[str, Any], compression: str = "auto"):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        self.compression = compression
        self.file = h5py.File(self.tmp, "w")
        self.file.attrs.update({"format": SHARD_FORMAT, "format_version": FORMAT_VERSION,
                                "hpcvid_version": hpcvid.__version__, "created": time.time()})
        for key, value in attrs.items():
            self.file.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        self.counts: dict[str, int] = {}

    def _filters(self, dtype: np.dtype) -> dict[str, Any]:
        choice = self.compression
        if choice == "auto":   # integer pixels compress well; float latents barely do and cost CPU
            choice = "gzip" if np.issubdtype(dtype, np.integer) else "none"
        if choice == "gzip":
            return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        return {"compression": "lzf"} if choice == "lzf" else {}

    def _append(self, group: h5py.Group, name: str, data: np.ndarray, compress: bool = False) -> None:
        if name not in group:
            extra = self._filters(data.dtype) if compress else {}
            group.create_dataset(name, shape=(0, *data.shape[1:]), maxshape=(None, *data.shape[1:]),
                                 dtype=data.dtype, chunks=(1, *data.shape[1:]), **extra)
        dset = group[name]
        if dset.shape[1:] != data.shape[1:]:
            raise ValueError(f"{self.path}:{group.name}/{name}: shape {data.shape[1:]} != {dset.shape[1:]}")
        n = dset.shape[0]
        dset.resize(n + data.shape[0], axis=0)
        dset[n:] = data

    def add(self, bucket: tuple[int, int], latents: np.ndarray, records: list[ClipRecord],
            text_emb: Optional[np.ndarray] = None, text_mask: Optional[np.ndarray] = None,
            extras: Optional[dict[str, np.ndarray]] = None) -> None:
        """Append a batch of B clips of one bucket: latents (B, ...), text (B, L, D) + mask (B, L), extras (B, ...)."""
        if latents.shape[0] != len(records):
            raise ValueError(f"{len(records)} records for {latents.shape[0]} latents")
        name = bucket_name(bucket)
        group = self.file.require_group(f"clips/{name}")
        group.attrs["bucket"] = list(bucket)
        self._append(group, "latents", latents, compress=True)
        self._append(group, "clip_id", np.array([clip_id(r.video_id, r.start_frame) for r in records], dtype=object).astype(STR))
        self._append(group, "video_id", np.array([r.video_id for r in records], dtype=object).astype(STR))
        self._append(group, "caption", np.array([r.caption for r in records], dtype=object).astype(STR))
        self._append(group, "row", np.array([r.row for r in records], dtype=np.int64))
        self._append(group, "start_frame", np.array([r.start_frame for r in records], dtype=np.int64))
        self._append(group, "stride", np.array([r.stride for r in records], dtype=np.int32))
        self._append(group, "fps", np.array([r.fps for r in records], dtype=np.float32))
        if text_emb is not None:
            self._append(group, "text_emb", text_emb.astype(np.float16))
            self._append(group, "text_mask", text_mask.astype(bool))
        for key, value in (extras or {}).items():
            self._append(group.require_group("extras"), key, value, compress=True)
        self.counts[name] = self.counts.get(name, 0) + len(records)

    def commit(self) -> int:
        """Close, fsync and rename into place; returns the file size in bytes."""
        self.file.attrs["num_clips"] = sum(self.counts.values())
        self.file.attrs["buckets"] = json.dumps(self.counts)
        self.file.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        return self.path.stat().st_size

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


# ---------------------------------------------------------------------------------------------------- dataset folder

def claim_dataset(folder: Path, identity: dict[str, Any]) -> None:
    """Record what this folder holds, or refuse when it already holds a dataset made from a different spec."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset.json"
    with _locked(folder):
        existing = read_json(path)
        if existing is None:
            atomic_write_json(path, identity)
            return
    if existing.get("digest") != identity["digest"]:
        differ = sorted(k for k in set(existing.get("spec", {})) | set(identity["spec"])
                        if existing.get("spec", {}).get(k) != identity["spec"].get(k))
        raise UserError(f"{path}: this folder holds a dataset made with a different spec (differs in: "
                        f"{', '.join(differ) or 'format'}); choose a new prep.output or delete the folder")


def shard_done(folder: Path, shard: int) -> Optional[dict]:
    """The shard's marker when the shard is complete and intact, else None (it must be redone)."""
    marker = read_json(folder / f"{shard_name(shard)}.json")
    if not marker:
        return None
    try:
        size = (folder / f"{shard_name(shard)}.h5").stat().st_size
    except OSError:
        return None
    return marker if size == marker.get("bytes") else None


def clear_partial(folder: Path, shard: int) -> None:
    """Remove leftovers of an interrupted attempt at `shard`: its torn temporaries (.h5 or marker), a shard
    without marker."""
    name = shard_name(shard)
    _remove_temporaries(folder, f".{name}.")
    if read_json(folder / f"{name}.json") is None:
        with contextlib.suppress(OSError):
            (folder / f"{name}.h5").unlink()


def _remove_temporaries(folder: Path, prefix: str) -> None:
    for leftover in folder.glob(f"{prefix}*.tmp"):
        with contextlib.suppress(OSError):
            leftover.unlink()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock so concurrent workers (ranks, array tasks) take turns rebuilding the index."""
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def rebuild_index(folder: Path) -> dict[str, Any]:
    """Summarise every complete shard into index.json and failures.jsonl (atomic, idempotent, under a lock)."""
    folder = Path(folder)
    with _locked(folder):
        for summary in ("index.json", "failures.jsonl", "warnings.jsonl"):   # only written under this lock: any
                                                                            # temporary is torn
            _remove_temporaries(folder, f".{summary}.")
        identity = read_json(folder / "dataset.json")
        if identity is None:
            raise UserError(f"{folder}: not an hpcvid dataset (no dataset.json)")
        total_shards = identity["num_shards"]
        totals = {"rows": 0, "done": 0, "filtered": 0, "failed": 0, "clips": 0, "bytes": 0}
        reasons: dict[str, dict[str, int]] = {"filtered": {}, "failed": {}}
        buckets: dict[str, int] = {}
        warnings: dict[str, int] = {}
        shards, failures, warning_details, seconds = [], [], [], 0.0
        for shard in range(total_shards):
            marker = shard_done(folder, shard)
            if marker is None:
                continue
            for key in totals:
                totals[key] += marker[key]
            for status in reasons:
                for reason, n in marker["reasons"][status].items():
                    reasons[status][reason] = reasons[status].get(reason, 0) + n
            for name, n in marker["buckets"].items():
                buckets[name] = buckets.get(name, 0) + n
            for code, n in marker.get("warnings", {}).items():     # markers of hpcvid < 0.3 have none
                warnings[code] = warnings.get(code, 0) + n
            failures += marker["failures"]
            warning_details += marker.get("warning_details", [])
            seconds += marker["seconds"]
            shards.append({k: marker[k] for k in ("shard", "file", "rows_start", "rows_stop", "clips", "bytes",
                                                   "buckets")})
        index = {
            "format": "hpcvid-dataset-index", "format_version": FORMAT_VERSION, "updated": time.time(),
            "dataset_digest": identity["digest"], "encoder": identity["encoder"],
            "latent": identity.get("latent"), "text": identity.get("text"),
            "total_rows": identity["total_rows"], "num_shards": total_shards, "complete_shards": len(shards),
            "complete": len(shards) == total_shards, "totals": totals, "reasons": reasons, "warnings": warnings,
            "buckets": buckets,
            "worker_seconds": round(seconds, 3), "shards": shards,
        }
        for name, records in (("failures.jsonl", failures), ("warnings.jsonl", warning_details)):
            lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=lambda r: r["row"]))
            atomic_write_bytes(folder / name, lines.encode())
        atomic_write_json(folder / "index.json", index)
    return index


# ---------------------------------------------------------------------------------------------------- reading

class ShardFormatError(UserError):
    """A shard that does not match the documented format (wrong attrs, shapes or dtypes)."""


def open_shard(path: Path) -> h5py.File:
    """Open a shard read-only after checking it is one of ours; the caller closes it."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ShardFormatError(f"{path}: not a readable HDF5 file ({e})") from None
    if f.attrs.get("format") != SHARD_FORMAT or int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
        f.close()
        raise ShardFormatError(f"{path}: attrs.format: not an hpcvid shard of format version {FORMAT_VERSION}")
    return f


def validate_shard(path: Path, latent_shape: Optional[dict[str, list[int]]] = None) -> int:
    """Check every bucket group's datasets agree in length, dtype and (optionally) latent shape; returns clips."""
    total = 0
    with open_shard(path) as f:
        for name, group in f.get("clips", {}).items():
            n = group["latents"].shape[0]
            for key in PER_CLIP_FIELDS + tuple(k for k in ("text_emb", "text_mask") if k in group):
                if group[key].shape[0] != n:
                    raise ShardFormatError(f"{path}: clips/{name}/{key}: {group[key].shape[0]} entries for {n} clips")
            if "text_emb" in group and group["text_emb"].dtype != np.float16:
                raise ShardFormatError(f"{path}: clips/{name}/text_emb: dtype {group['text_emb'].dtype}, not float16")
            if latent_shape and name in latent_shape and list(group["latents"].shape[1:]) != latent_shape[name]:
                raise ShardFormatError(f"{path}: clips/{name}/latents: shape {list(group['latents'].shape[1:])}, "
                                       f"expected {latent_shape[name]}")
            total += n
        if total != int(f.attrs.get("num_clips", -1)):
            raise ShardFormatError(f"{path}: attrs.num_clips: {f.attrs.get('num_clips')} but {total} clips stored")
    return total


def iter_clips(folder: Path) -> Iterator[dict[str, Any]]:
    """Every clip of every complete shard in index order, as plain numpy/str values (tests, inspection)."""
    index = read_json(Path(folder) / "index.json")
    if index is None:
        raise UserError(f"{folder}: no index.json (run prep first)")
    for entry in index["shards"]:
        with open_shard(Path(folder) / entry["file"]) as f:
            for name, group in f.get("clips", {}).items():
                for i in range(group["latents"].shape[0]):
                    clip = {key: group[key][i] for key in group if isinstance(group[key], h5py.Dataset)}
                    for key in ("clip_id", "video_id", "caption"):
                        clip[key] = clip[key].decode() if isinstance(clip[key], bytes) else clip[key]
                    clip["bucket"], clip["shard"] = name, entry["shard"]
                    yield clip

"""A prep dataset folder: completion markers, the dataset index, and reading its shards in order.

A dataset folder holds (format documented in docs/shard_format.md):
    dataset.json              identity: the spec parts that determine the content, fixed on first run
    shard-00000.h5            clips of manifest rows [0, R), grouped by bucket (layout: hpcvid.data.shard_file)
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
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from hpcvid.config import UserError
from hpcvid.data.shard_file import ShardReader, field_bytes
from hpcvid.io import atomic_write_bytes, atomic_write_json, read_json

DATASET_FORMAT_VERSION = 2     # 2: shards of format 2, warnings and field bytes in markers and index


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def clip_id(video_id: str, start_frame: int) -> str:
    return f"{video_id}@{start_frame}"


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
    """Summarise every complete shard into index.json, failures.jsonl and warnings.jsonl (atomic, idempotent,
    under a lock)."""
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
        field_bytes: dict[str, int] = {}
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
            for code, n in marker.get("warnings", {}).items():     # markers of format 1 have none
                warnings[code] = warnings.get(code, 0) + n
            for name, n in marker.get("field_bytes", {}).items():
                field_bytes[name] = field_bytes.get(name, 0) + n
            failures += marker["failures"]
            warning_details += marker.get("warning_details", [])
            seconds += marker["seconds"]
            shards.append({k: marker[k] for k in ("shard", "file", "rows_start", "rows_stop", "clips", "bytes",
                                                   "buckets")})
        index = {
            "format": "hpcvid-dataset-index", "format_version": DATASET_FORMAT_VERSION, "updated": time.time(),
            "dataset_digest": identity["digest"], "encoder": identity["encoder"],
            "latent": identity.get("latent"), "text": identity.get("text"),
            "total_rows": identity["total_rows"], "num_shards": total_shards, "complete_shards": len(shards),
            "complete": len(shards) == total_shards, "totals": totals, "reasons": reasons, "warnings": warnings,
            "buckets": buckets, "field_bytes": field_bytes,
            "worker_seconds": round(seconds, 3), "shards": shards,
        }
        for name, records in (("failures.jsonl", failures), ("warnings.jsonl", warning_details)):
            lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=lambda r: r["row"]))
            atomic_write_bytes(folder / name, lines.encode())
        atomic_write_json(folder / "index.json", index)
    return index


# ---------------------------------------------------------------------------------------------------- reading

def iter_clips(folder: Path) -> Iterator[dict[str, Any]]:
    """Every clip of every complete shard in index order, as plain numpy/str values (see ShardReader)."""
    index = read_json(Path(folder) / "index.json")
    if index is None:
        raise UserError(f"{folder}: no index.json (run prep first)")
    for entry in index["shards"]:
        with ShardReader(Path(folder) / entry["file"]) as shard:
            for clip in shard:
                clip["shard"] = entry["shard"]
                yield clip


def dataset_field_bytes(folder: Path, index: dict[str, Any]) -> dict[str, int]:
    """Bytes of the complete shards by field (latents, text, each picture, ids, hdf5_structure): from the markers
    of format 2, measured from the files for a dataset of format 1."""
    if index.get("field_bytes"):
        return dict(index["field_bytes"])
    import h5py

    total: dict[str, int] = {}
    for entry in index["shards"]:
        path = Path(folder) / entry["file"]
        with h5py.File(path, "r") as f:
            sizes = field_bytes(f)
        sizes["hdf5_structure"] = path.stat().st_size - sum(sizes.values())
        for key, n in sizes.items():
            total[key] = total.get(key, 0) + n
    return total

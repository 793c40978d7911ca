"""Manifests: which videos a dataset is made of, from WebVid / OpenVid-1M CSVs or a plain folder.

Rows are numbered in manifest order (0-based, data rows only). That number is the row's identity everywhere:
shard i holds rows [i * rows_per_shard, (i + 1) * rows_per_shard), so every row lands in exactly one shard
whatever the number of ranks or array tasks, and every row is accounted for as done, filtered or failed.

Layouts (the real column names of the public releases):
- webvid:  videoid, contentUrl, duration, page_dir, name   file: <root>/<videoid>.mp4 or <root>/<page_dir>/<videoid>.mp4
- openvid: video, caption, aesthetic score, motion score, temporal consistency score, camera motion, frame, fps,
           seconds                                          file: <root>/<video>
- folder:  every video file under the folder (sorted); caption from <name>.txt beside it, if any; video id = the
           relative path without extension (with it, when two files share a stem)
"""
from __future__ import annotations

import collections
import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from hpcvid.config import ManifestSpec, UserError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
WEBVID_COLUMNS = ("videoid", "name")                 # required; duration and page_dir are used when present
OPENVID_COLUMNS = ("video", "caption")
OPENVID_SCORES = {                                   # spec field -> (column, keep-if comparison)
    "min_aesthetic_score": ("aesthetic score", "min"),
    "min_motion_score": ("motion score", "min"),
    "max_motion_score": ("motion score", "max"),
    "min_temporal_consistency_score": ("temporal consistency score", "min"),
}


class ManifestError(UserError):
    """The manifest as a whole is unusable (missing file, missing column): a user error, not a bad row."""


@dataclass(frozen=True)
class Row:
    index: int                      # 0-based position in the manifest
    video_id: str
    candidates: tuple[str, ...]     # where the file may be; the first that exists is used
    caption: str
    duration: Optional[float] = None
    meta: dict = field(default_factory=dict)   # layout-specific columns (scores, camera motion, ...), raw strings


@dataclass(frozen=True)
class RowProblem:
    """Why a row yields no clips. status 'filtered' is by choice (the spec's filters); 'failed' is bad input."""
    status: str                     # "filtered" | "failed"
    reason: str                     # short code: duration_too_short, missing_file, empty_caption, bad_row, ...
    detail: str                     # one human line


# ---------------------------------------------------------------------------------------------------- reading

def iter_manifest(spec: ManifestSpec, keep: Callable[[int], bool] = lambda index: True) -> Iterator[Row]:
    """Yield the rows whose index passes `keep`, in manifest order. Raises ManifestError for an unusable manifest."""
    if spec.kind == "folder":
        yield from _iter_folder(spec, keep)
    else:
        yield from _iter_csv(spec, keep)


def count_rows(spec: ManifestSpec) -> int:
    """Number of rows (after `limit`); reads the whole manifest once without building rows."""
    if spec.kind == "folder":
        n = len(_folder_files(Path(spec.path)))
    else:
        with _open_csv(spec) as (reader, _):
            n = sum(1 for _ in reader)
    return min(n, spec.limit) if spec.limit is not None else n


def _folder_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ManifestError(f"{root}: manifest.path: not a folder (manifest.kind is 'folder')")
    files = [p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _iter_folder(spec: ManifestSpec, keep: Callable[[int], bool]) -> Iterator[Row]:
    root = Path(spec.path)
    files = _folder_files(root)
    stems = collections.Counter(p.relative_to(root).with_suffix("").as_posix() for p in files)
    for index, path in enumerate(files):
        if spec.limit is not None and index >= spec.limit:
            return
        if not keep(index):
            continue
        caption_file = path.with_suffix(".txt")
        try:
            caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            caption = ""
        relative = path.relative_to(root)
        stem = relative.with_suffix("").as_posix()
        video_id = stem if stems[stem] == 1 else relative.as_posix()   # clip.mp4 + clip.mov: keep extensions
        yield Row(index, video_id, (str(path),), caption)


class _open_csv:
    """Context manager giving a csv.DictReader whose header was checked for the layout's required columns."""

    def __init__(self, spec: ManifestSpec):
        self.spec = spec

    def __enter__(self):
        path = Path(self.spec.path)
        try:
            self.handle = open(path, newline="", encoding="utf-8", errors="replace")
        except OSError as e:
            raise ManifestError(f"{path}: manifest.path: cannot open the CSV ({e.strerror})") from None
        reader = csv.DictReader(self.handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        required = WEBVID_COLUMNS if self.spec.kind == "webvid" else OPENVID_COLUMNS
        needed = list(required)
        if self.spec.min_duration is not None or self.spec.max_duration is not None:
            needed.append("duration" if self.spec.kind == "webvid" else "seconds")
        needed += [OPENVID_SCORES[name][0] for name in OPENVID_SCORES if getattr(self.spec, name) is not None]
        if self.spec.camera_motion is not None:
            needed.append("camera motion")
        missing = [c for c in needed if c not in header]
        if missing:
            self.handle.close()
            raise ManifestError(f"{path}: header: missing column {missing[0]!r} for a {self.spec.kind} manifest "
                                f"(found: {', '.join(header) or 'no header'})")
        return reader, path

    def __exit__(self, *exc):
        self.handle.close()


def _iter_csv(spec: ManifestSpec, keep: Callable[[int], bool]) -> Iterator[Row]:
    root = Path(spec.video_root) if spec.video_root else Path(spec.path).parent
    with _open_csv(spec) as (reader, _):
        for index, record in enumerate(reader):
            if spec.limit is not None and index >= spec.limit:
                return
            if not keep(index):
                continue
            record = {k: (v or "").strip() for k, v in record.items() if k is not None}
            if spec.kind == "webvid":
                video_id = record["videoid"]
                candidates = [str(root / f"{video_id}.mp4")]
                if record.get("page_dir"):
                    candidates.append(str(root / record["page_dir"] / f"{video_id}.mp4"))
                duration_text, caption = record.get("duration", ""), record["name"]
            else:
                video_id = str(Path(record["video"]).with_suffix("")) if record["video"] else ""
                candidates = [str(root / record["video"])] if record["video"] else []
                duration_text, caption = record.get("seconds", ""), record["caption"]
            yield Row(index, video_id, tuple(candidates), caption, _parse_duration(duration_text), record)


_ISO_DURATION = re.compile(r"^P(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)$")


def _parse_duration(text: str) -> Optional[float]:
    """Seconds from '11.5' or WebVid's ISO 8601 'PT00H00M11S'; None when empty or unparseable."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    match = _ISO_DURATION.match(text)
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


# ---------------------------------------------------------------------------------------------------- checks

def check_row(row: Row, spec: ManifestSpec) -> tuple[Optional[Path], Optional[RowProblem]]:
    """Apply the spec's filters and input checks to one row: (the video file, None) or (None, the problem)."""
    if not row.video_id:
        return None, RowProblem("failed", "bad_row", f"row {row.index}: empty video name")
    problem = _filter_problem(row, spec)
    if problem:
        return None, problem
    if spec.require_caption and not row.caption:
        return None, RowProblem("failed", "empty_caption", f"row {row.index} ({row.video_id}): empty caption")
    for candidate in row.candidates:
        if os.path.isfile(candidate):
            return Path(candidate), None
    tried = " or ".join(row.candidates) or "(no path)"
    status = "filtered" if spec.skip_missing else "failed"
    return None, RowProblem(status, "missing_file", f"row {row.index} ({row.video_id}): no file at {tried}")


def _filter_problem(row: Row, spec: ManifestSpec) -> Optional[RowProblem]:
    where = f"row {row.index} ({row.video_id})"
    if spec.min_duration is not None or spec.max_duration is not None:
        if row.duration is None:
            return RowProblem("failed", "bad_row", f"{where}: duration is missing or not a number")
        if spec.min_duration is not None and row.duration < spec.min_duration:
            return RowProblem("filtered", "duration_too_short",
                              f"{where}: {row.duration:g} s < min_duration {spec.min_duration:g}")
        if spec.max_duration is not None and row.duration > spec.max_duration:
            return RowProblem("filtered", "duration_too_long",
                              f"{where}: {row.duration:g} s > max_duration {spec.max_duration:g}")
    for name, (column, kind) in OPENVID_SCORES.items():
        threshold = getattr(spec, name)
        if threshold is None:
            continue
        try:
            value = float(row.meta.get(column, ""))
        except ValueError:
            return RowProblem("failed", "bad_row", f"{where}: {column!r} is {row.meta.get(column)!r}, not a number")
        if (kind == "min" and value < threshold) or (kind == "max" and value > threshold):
            return RowProblem("filtered", name.replace("min_", "low_").replace("max_", "high_"),
                              f"{where}: {column} {value:g} fails {name} {threshold:g}")
    if spec.camera_motion is not None and row.meta.get("camera motion") not in spec.camera_motion:
        return RowProblem("filtered", "camera_motion",
                          f"{where}: camera motion {row.meta.get('camera motion')!r} not in {spec.camera_motion}")
    return None


# ---------------------------------------------------------------------------------------------------- partition

def num_shards(total_rows: int, rows_per_shard: int) -> int:
    return (total_rows + rows_per_shard - 1) // rows_per_shard


def shard_of(row_index: int, rows_per_shard: int) -> int:
    return row_index // rows_per_shard


def shard_rows(shard: int, total_rows: int, rows_per_shard: int) -> range:
    """The manifest rows that make up `shard` (contiguous)."""
    return range(shard * rows_per_shard, min((shard + 1) * rows_per_shard, total_rows))


def shards_for_worker(total_shards: int, worker_index: int, num_workers: int) -> list[int]:
    """Round-robin: worker w takes shards w, w + W, w + 2W, ... (balanced, and stable across reruns)."""
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index {worker_index} outside [0, {num_workers})")
    return list(range(worker_index, total_shards, num_workers))

"""Helpers for the prep integration tests: tiny job files, and a reader that checks a dataset folder against
docs/shard_format.md with h5py and json alone (not through hpcvid's own reader)."""
from __future__ import annotations

import copy
import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np
import yaml

# A tiny prep config: 8-frame clips at the native rate, two small buckets, no text encoder, 2 rows per shard.
BASE_PREP: dict[str, Any] = {
    "clip": {"num_frames": 8, "fps": None, "clips_per_video": 2},
    "buckets": [[32, 32], [32, 48]],
    "text": {"encoder": "none", "max_tokens": 16},
    "encoder": {"kind": "pixels", "downsample": 1},
    "shards": {"rows_per_shard": 2},
    "batch_size": 4,
    "decode_workers": 1,
    "progress": False,
}
PER_CLIP = ("clip_id", "video_id", "row", "start_frame", "stride", "fps", "text_index")
FAILURE_KEYS = {"row", "video_id", "shard", "path", "reason", "detail"}
SHARD_FILE = re.compile(r"^shard-(\d{5})\.(h5|json)$")


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied recursively (a mapping merges, anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def prep_section(manifest: dict, output: Path, **changes) -> dict:
    return merged(BASE_PREP, {"manifest": manifest, "output": str(output), **changes})


def write_job(path: Path, manifest: dict, output: Path, **changes) -> Path:
    """A job YAML with one `prep:` section: BASE_PREP, the manifest, the output folder, then `changes`."""
    path.write_text(yaml.safe_dump({"prep": prep_section(manifest, output, **changes)}, sort_keys=False))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def markers(folder: Path) -> dict[int, dict]:
    """Every completion marker in the folder, by shard number."""
    return {int(m.group(1)): read_json(p) for p in Path(folder).iterdir()
            if (m := SHARD_FILE.match(p.name)) and m.group(2) == "json"}


def shard_files_state(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime_ns, size) of every shard .h5 and marker: equal before and after means nothing was rewritten."""
    out = {}
    for p in sorted(Path(folder).iterdir()):
        if SHARD_FILE.match(p.name):
            st = p.stat()
            out[p.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def leftovers(folder: Path) -> list[str]:
    """Temporary files of interrupted writes."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp") or ".tmp" in p.suffixes)


def one_line(stream: str) -> str:
    lines = [ln for ln in stream.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{stream}"
    return lines[0]


# warnings a stage may print before failing that are not part of its error (training: no GPU -> fp32)
EXPECTED_WARNINGS = ("no GPU visible",)


def assert_cli_ok(res) -> None:
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr


def assert_user_error(res, *needles: str) -> str:
    """Exit 2, exactly one stderr line (besides expected warnings) naming every needle, no traceback."""
    assert res.returncode == 2, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    line = one_line("\n".join(ln for ln in res.stderr.splitlines() if not any(w in ln for w in EXPECTED_WARNINGS)))
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@dataclass
class Dataset:
    folder: Path
    identity: dict
    index: dict
    markers: dict[int, dict]
    failures: list[dict]
    clips: dict[str, dict]          # clip_id -> per-clip values (latents as numpy) + bucket + shard

    def by_video(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for clip in self.clips.values():
            out.setdefault(clip["video_id"], []).append(clip)
        for clips in out.values():
            clips.sort(key=lambda c: c["start_frame"])
        return out

    def failure_reasons(self) -> dict[str, str]:
        """video_id -> reason of its failed row."""
        return {f["video_id"]: f["reason"] for f in self.failures}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _picture(data: bytes, shape: list[int]) -> np.ndarray:
    """A stored picture (a PNG or WebP file), decoded with Pillow directly: uint8 (3, H, W)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        array = np.asarray(picture.convert("RGB")).transpose(2, 0, 1)
    assert list(array.shape) == list(shape), (array.shape, shape)
    return array


def read_shard(path: Path, latent_shapes: dict[str, list[int]], rows: range, dtype: str) -> dict[str, dict]:
    """Every clip of one shard (format 2), checking the documented layout on the way. Per clip: the per-clip
    fields, `caption` and (with a text encoder) `text_states` (L, D) from /text, and each picture by name."""
    clips = {}
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "hpcvid-shard" and int(f.attrs["format_version"]) == 2, dict(f.attrs)
        assert (int(f.attrs["rows_start"]), int(f.attrs["rows_stop"])) == (rows.start, rows.stop)
        captions = [_text(c) for c in f["text/caption"][()]]
        assert len(set(captions)) == len(captions), "a caption stored twice in one shard"
        states = offsets = None
        if "states" in f["text"]:
            states, offsets = f["text/states"][()], f["text/offsets"][()]
            assert states.dtype == np.float16 and offsets.dtype == np.int64
            assert offsets[0] == 0 and offsets[-1] == len(states) and len(offsets) == len(captions) + 1
            assert np.all(np.diff(offsets) > 0), "a caption without token states"
        total = 0
        for name, group in f.get("clips", {}).items():
            assert list(group.attrs["bucket"]) == [int(x) for x in name.split("x")], name
            n = group["latents"].shape[0]
            assert n > 0, f"{path}: empty bucket group {name}"
            assert list(group["latents"].shape[1:]) == latent_shapes[name], (name, group["latents"].shape)
            assert group["latents"].dtype == np.dtype(dtype)
            for key in PER_CLIP:
                assert group[key].shape == (n,), (key, group[key].shape)
            assert group["row"].dtype == np.int64 and group["start_frame"].dtype == np.int64
            assert group["stride"].dtype == np.int32 and group["fps"].dtype == np.float32
            assert group["text_index"].dtype == np.int32
            pictures = {}
            for key, sub in group.get("images", {}).items():
                assert sub.attrs["codec"] in ("png", "webp") and sub["offsets"].shape == (n + 1,)
                pictures[key] = (sub["data"][()].tobytes(), sub["offsets"][()], list(sub.attrs["shape"]))
            values = {key: group[key][()] for key in group if isinstance(group[key], h5py.Dataset)}
            for i in range(n):
                clip = {key: values[key][i] for key in values}
                for key in ("clip_id", "video_id"):
                    clip[key] = _text(clip[key])
                k = int(clip.pop("text_index"))
                clip["caption"] = captions[k]
                if states is not None:
                    clip["text_states"] = states[offsets[k]:offsets[k + 1]]
                for key, (data, offs, shape) in pictures.items():
                    clip[key] = _picture(data[offs[i]:offs[i + 1]], shape)
                clip["row"], clip["start_frame"] = int(clip["row"]), int(clip["start_frame"])
                clip["stride"], clip["fps"] = int(clip["stride"]), float(clip["fps"])
                clip["bucket"], clip["shard_file"] = name, path.name
                assert clip["row"] in rows, (clip["row"], rows)
                assert clip["clip_id"] == f"{clip['video_id']}@{clip['start_frame']}", clip["clip_id"]
                assert clip["clip_id"] not in clips, f"duplicate clip_id {clip['clip_id']} in {path}"
                clips[clip["clip_id"]] = clip
            rows_in_order = values["row"].tolist()
            assert rows_in_order == sorted(rows_in_order), f"{path}:{name}: clips not in manifest-row order"
            total += n
        assert int(f.attrs["num_clips"]) == total
    return clips


def check_dataset(folder: Path, total_rows: Optional[int] = None, complete: bool = True) -> Dataset:
    """Read a dataset folder and check everything docs/shard_format.md promises holds together."""
    folder = Path(folder)
    identity = read_json(folder / "dataset.json")
    index = read_json(folder / "index.json")
    assert identity["format"] == "hpcvid-dataset" and identity["format_version"] == 2
    assert index["dataset_digest"] == identity["digest"]
    if total_rows is not None:
        assert identity["total_rows"] == index["total_rows"] == total_rows
    rps = identity["spec"]["shards"]["rows_per_shard"]
    assert identity["num_shards"] == index["num_shards"] == -(-identity["total_rows"] // rps)
    assert index["complete"] is complete, index
    found = markers(folder)
    complete_markers = {s: m for s, m in found.items()
                        if (folder / m["file"]).is_file() and (folder / m["file"]).stat().st_size == m["bytes"]}
    assert index["complete_shards"] == len(complete_markers)
    assert [e["shard"] for e in index["shards"]] == sorted(complete_markers)
    if complete:
        assert sorted(complete_markers) == list(range(identity["num_shards"]))

    totals = {k: 0 for k in ("rows", "done", "filtered", "failed", "clips", "bytes")}
    reasons: dict[str, dict[str, int]] = {"filtered": {}, "failed": {}}
    clips: dict[str, dict] = {}
    marker_failures = []
    for shard, m in sorted(complete_markers.items()):
        rows = range(shard * rps, min((shard + 1) * rps, identity["total_rows"]))
        assert (m["shard"], m["rows_start"], m["rows_stop"], m["rows"]) == (shard, rows.start, rows.stop, len(rows))
        assert m["rows"] == m["done"] + m["filtered"] + m["failed"], m
        assert sum(m["reasons"]["failed"].values()) == m["failed"] == len(m["failures"])
        assert sum(m["reasons"]["filtered"].values()) == m["filtered"]
        for key in totals:
            totals[key] += m[key]
        for status in reasons:
            for reason, n in m["reasons"][status].items():
                reasons[status][reason] = reasons[status].get(reason, 0) + n
        marker_failures += m["failures"]
        shard_clips = read_shard(folder / m["file"], identity["latent"]["shapes"], rows, identity["latent"]["dtype"])
        assert len(shard_clips) == m["clips"]
        per_bucket: dict[str, int] = {}
        for c in shard_clips.values():
            per_bucket[c["bucket"]] = per_bucket.get(c["bucket"], 0) + 1
        assert per_bucket == m["buckets"]
        assert len({c["row"] for c in shard_clips.values()}) == m["done"], "a done row without clips (or the reverse)"
        duplicates = set(clips) & set(shard_clips)
        assert not duplicates, f"clip_ids in two shards: {sorted(duplicates)[:5]}"
        clips.update(shard_clips)
    assert index["totals"] == totals
    assert index["reasons"] == reasons
    field_bytes: dict[str, int] = {}
    for m in complete_markers.values():
        assert sum(m["field_bytes"].values()) == m["bytes"], m["field_bytes"]      # every byte accounted for
        for key, n in m["field_bytes"].items():
            field_bytes[key] = field_bytes.get(key, 0) + n
    assert index["field_bytes"] == field_bytes
    if complete:
        assert totals["rows"] == identity["total_rows"]

    lines = (folder / "failures.jsonl").read_text().splitlines()
    failures = [json.loads(line) for line in lines]
    assert len(failures) == totals["failed"]
    assert [f["row"] for f in failures] == sorted(f["row"] for f in marker_failures)
    for f in failures:
        assert set(f) == FAILURE_KEYS, f
        assert "\n" not in f["detail"] and f["detail"]
    assert not leftovers(folder), leftovers(folder)
    return Dataset(folder, identity, index, complete_markers, failures, clips)


SUMMARY_TOTALS = re.compile(r"rows (\d+) = done (\d+) \+ filtered (\d+) \+ failed (\d+); clips (\d+)")
SUMMARY_RUN = re.compile(r"(\d+) shards written, (\d+) already complete")


def summary_numbers(stdout: str) -> dict[str, int]:
    """The dataset totals and this run's shard counts as the printed summary states them."""
    totals, run = SUMMARY_TOTALS.search(stdout), SUMMARY_RUN.search(stdout)
    assert totals and run, f"no summary in:\n{stdout}"
    rows, done, filtered, failed, clips = map(int, totals.groups())
    return {"rows": rows, "done": done, "filtered": filtered, "failed": failed, "clips": clips,
            "written": int(run.group(1)), "skipped": int(run.group(2))}

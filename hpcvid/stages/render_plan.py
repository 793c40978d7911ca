"""The bookkeeping of a render: which clips each rank makes, what is already on disk, and what the result measures.

A video of `clips` clips is cut into units (the least common multiple of both models' windows and the segment
size, in clips), padded to whole units (the extra clips are generated and dropped), and the units are split over
the ranks in contiguous runs. Every rank's run is whole keyframe windows, whole motion windows and whole
segments, so no window or segment spans two ranks.

On disk, per video folder (docs/rendering.md):
    plan.json                    what this render is (prompts, models, settings): a rerun must match it
    keyframes/<first>-<stop>.npy float32 (clips, 3, H, W) content frames of clips [first, stop)
    motion/<first>-<stop>.npy    float32 (clips, C, T', h, w) motion latents
    segments/<first>-<stop>.mp4  the decoded clips [first, stop)
Any clip range can be read back from the .npy files of an earlier run, whatever its number of ranks.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from hpcvid.config import UserError
from hpcvid.io import atomic_write_json, atomic_write_with, read_json
from hpcvid.parallel.clip_parallel import split_runs

RANGE = re.compile(r"(\d{6,})-(\d{6,})")


@dataclass(frozen=True)
class Plan:
    clips: int                              # clips of the video
    unit: int                               # clips per unit
    runs: tuple[tuple[int, int], ...]       # [first, stop) clips of each rank (whole units; the last may pad)
    segment_clips: int

    @classmethod
    def make(cls, clips: int, windows: Sequence[int], segment_clips: int, world: int) -> "Plan":
        unit = math.lcm(*windows, segment_clips)
        units = -(-clips // unit)
        if units < world:
            raise UserError(f"render: {clips} clips make {units} unit(s) of {unit} clips (the least common multiple "
                            f"of the model windows {list(windows)} and segment_clips {segment_clips}); {world} ranks "
                            f"need at least {world}: use at most {units} ranks, more clips or a smaller segment_clips")
        return cls(clips, unit, tuple((a * unit, b * unit) for a, b in split_runs(units, world)), segment_clips)

    @property
    def padded(self) -> int:
        return self.runs[-1][1]

    def segments(self, rank: Optional[int] = None) -> list[tuple[int, int]]:
        """[first, stop) of the segments (of one rank, or all), cut at the video's end; padding clips are none's."""
        runs = self.runs if rank is None else [self.runs[rank]]
        return [(s, min(s + self.segment_clips, self.clips)) for a, b in runs
                for s in range(a, b, self.segment_clips) if s < self.clips]


def range_name(first: int, stop: int, suffix: str) -> str:
    return f"{first:06d}-{stop:06d}{suffix}"


class RangeStore:
    """float32 arrays along clips, saved as <first>-<stop>.npy; reads any range from the files present."""

    def __init__(self, folder: Path, tail: tuple[int, ...]):
        self.folder, self.tail = Path(folder), tuple(tail)      # tail: the shape of one clip's entry

    def _files(self) -> list[tuple[int, int, Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.glob("*.npy"):
            m = RANGE.fullmatch(path.stem)
            if m and int(m.group(1)) < int(m.group(2)):
                found.append((int(m.group(1)), int(m.group(2)), path))
        return sorted(found)

    def covers(self, first: int, stop: int) -> bool:
        reach = first
        for a, b, _ in self._files():
            if a <= reach < b:
                reach = b
        return reach >= stop

    def clear(self, first: int, stop: int) -> None:
        """Remove the files that overlap [first, stop), before it is written anew: an earlier attempt's pieces of
        that range (written with another rank count) must not mix with the new one."""
        for a, b, path in self._files():
            if a < stop and first < b:
                path.unlink(missing_ok=True)

    def write(self, first: int, array: np.ndarray) -> None:
        if array.dtype != np.float32 or array.shape[1:] != self.tail:
            raise ValueError(f"RangeStore {self.folder}: expected float32 (n, {self.tail}), got {array.dtype} "
                             f"{array.shape}")
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / range_name(first, first + len(array), ".npy")

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)

        atomic_write_with(path, save)

    def read(self, first: int, stop: int) -> np.ndarray:
        """(stop - first, *tail) float32, checked against what each file claims to hold."""
        out = np.empty((stop - first, *self.tail), np.float32)
        filled = first
        for a, b, path in self._files():
            if not a <= filled < b:
                continue
            data = np.load(path, allow_pickle=False, mmap_mode="r")
            if data.dtype != np.float32 or data.shape != (b - a, *self.tail):
                raise UserError(f"{path}: holds {data.dtype} {data.shape}, expected float32 {(b - a, *self.tail)}; "
                                f"delete it to render that part again")
            take = min(b, stop) - filled
            out[filled - first:filled - first + take] = data[filled - a:filled - a + take]
            filled += take
            if filled >= stop:
                return out
        raise UserError(f"{self.folder}: clips {filled}..{stop - 1} are missing")


def check_plan(folder: Path, plan: dict[str, Any]) -> bool:
    """Write plan.json, or compare with the one there: True when resuming, UserError when it is another render."""
    path = folder / "plan.json"
    old = read_json(path)
    if old is None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, plan)
        return False
    changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
    if changed:
        key = changed[0]
        raise UserError(f"{path}: this folder holds another render ({key}: {old.get(key)!r} there, "
                        f"{plan.get(key)!r} now); render into another output or delete the folder")
    return True


def peak_memory_mb(device) -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss elsewhere), or the GPU's peak allocation."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def seam_statistics(video: Path, frames_per_clip: int, rank_starts: Sequence[int],
                    keep: Sequence[int] = ()) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Read the joined video back frame by frame: its frame count, and the mean absolute change (0-255) from one
    frame to the next within clips, across clip boundaries and across rank boundaries. seam_ratio = across clips /
    within clips (1: boundaries look like any other frame step). Also returns the frames at indices `keep`."""
    import av

    sums = {"within": [0.0, 0], "clip": [0.0, 0], "rank": [0.0, 0]}
    rank_frames = {s * frames_per_clip for s in rank_starts if s > 0}
    previous, count, shape, kept = None, 0, None, []
    keep = set(keep)
    with av.open(str(video)) as container:
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24")                          # (H, W, 3) uint8
            if count in keep:
                kept.append(rgb)
            now, shape = rgb.astype(np.int16), rgb.shape
            if previous is not None:
                kind = "rank" if count in rank_frames else "clip" if count % frames_per_clip == 0 else "within"
                sums[kind][0] += float(np.abs(now - previous).mean())
                sums[kind][1] += 1
                if kind == "rank":
                    sums["clip"][0] += float(np.abs(now - previous).mean())
                    sums["clip"][1] += 1
            previous, count = now, count + 1
    mean = {k: (v[0] / v[1] if v[1] else None) for k, v in sums.items()}
    ratio = mean["clip"] / mean["within"] if mean["clip"] is not None and mean["within"] else None
    return {"frames": count, "frame_shape": list(shape or ()), "change_within_clips": mean["within"],
            "change_across_clips": mean["clip"], "change_across_ranks": mean["rank"], "seam_ratio": ratio}, kept

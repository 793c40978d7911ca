"""Clips for autoencoder training and evaluation, as uint8 frames (N, T, H, W, 3).

In memory per rank (`load_clips`): from a manifest (decoded with hpcvid.data.video) or from a prep dataset of
pixels (read with the shard reader). Each rank decodes its share once (rows rank, rank + W, ...; for shards, clips
rank, rank + W, ...) and keeps the clips as uint8 (3 T H W bytes each); `max_clips` bounds that. Unusable videos
are counted by reason, never raised. Streamed (`ClipStream`): batches read from a pixels prep dataset as they are
needed (hpcvid.data.dataset.ShardDataset), with memory bounded at any dataset size and a position to checkpoint.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from hpcvid.config import AEDataSpec, UserError
from hpcvid.data import manifest as mf
from hpcvid.data import shards as sh
from hpcvid.data.dataset import ShardDataset
from hpcvid.data.shard_file import clip_id
from hpcvid.data.video import VideoError, read_clips
from hpcvid.io import read_json


@dataclass
class ClipSet:
    """Decoded clips of one rank: uint8 frames (N, T, H, W, 3) with their ids and global order keys."""
    frames: torch.Tensor
    ids: list[str]
    order: list[tuple[int, int]]            # (position among the selected videos or clips, start frame)
    videos: int                             # videos that gave at least one clip
    problems: dict[str, int] = field(default_factory=dict)   # reason -> rows (or clips) that gave none


def _selected(video_id: str, data: AEDataSpec) -> bool:
    if data.include is not None and not any(fnmatch.fnmatchcase(video_id, p) for p in data.include):
        return False
    return not (data.exclude and any(fnmatch.fnmatchcase(video_id, p) for p in data.exclude))


def load_clips(data: AEDataSpec, rank: int, world: int) -> ClipSet:
    """This rank's clips (of the selected videos, rank::world), each resized and centre-cropped to data.resolution.

    data.max_clips: shards keep exactly the first N clips; manifests stop each rank after ceil(N / world) clips.
    Unusable videos are counted by reason, never raised."""
    if data.source == "shards":
        return _clips_from_shards(data, rank, world, data.max_clips)
    return _clips_from_manifest(data, rank, world, None if data.max_clips is None else -(-data.max_clips // world))


def _clips_from_manifest(data: AEDataSpec, rank: int, world: int, limit: Optional[int]) -> ClipSet:
    rows = [r for r in mf.iter_manifest(data.manifest) if _selected(r.video_id, data)]
    frames, ids, order, problems, videos = [], [], [], {}, 0
    T, res = data.clip.num_frames, tuple(data.resolution)
    for pos in range(rank, len(rows), world):
        if limit is not None and len(frames) >= limit:
            break
        row = rows[pos]
        path, problem = mf.check_row(row, data.manifest)
        if problem is not None:
            problems[problem.reason] = problems.get(problem.reason, 0) + 1
            continue
        try:
            _, clips = read_clips(path, T, data.clip.fps, data.clip.clips_per_video, [res], backend=data.decode_backend)
        except VideoError as e:
            problems[e.reason] = problems.get(e.reason, 0) + 1
            continue
        videos += 1
        for clip in clips[:None if limit is None else limit - len(frames)]:
            frames.append(torch.from_numpy(clip.frames))                       # (T, H, W, 3)
            ids.append(clip_id(row.video_id, clip.start))
            order.append((pos, clip.start))
    stacked = torch.stack(frames) if frames else torch.empty((0, T, *res, 3), dtype=torch.uint8)
    return ClipSet(stacked, ids, order, videos, problems)


def pixel_buckets(data: AEDataSpec) -> tuple[dict[str, Any], list[str]]:
    """(index.json, the buckets whose clips are 3 x clip.num_frames x resolution) of a pixels prep dataset; a
    UserError naming the folder for anything else."""
    folder = Path(data.shards)
    index = read_json(folder / "index.json")
    if index is None:
        raise UserError(f"{folder}: data.shards: no index.json (not a prep dataset, or prep has not finished)")
    if index["encoder"]["kind"] != "pixels" or index["encoder"].get("downsample", 1) != 1:
        raise UserError(f"{folder}: data.shards: autoencoders train on pixels; this dataset holds "
                        f"{json.dumps(index['encoder'])} latents (write one with prep encoder kind 'pixels', "
                        f"downsample 1)")
    want = [3, data.clip.num_frames, *data.resolution]
    shapes = index.get("latent", {}).get("shapes", {})
    names = [name for name, shape in shapes.items() if list(shape) == want]
    if not names:
        held = ", ".join(f"{k}: {v}" for k, v in shapes.items())
        raise UserError(f"{folder}: data.shards: no clip of shape {want} (3 x clip.num_frames x resolution); the "
                        f"dataset holds {held or 'no clips'}")
    return index, names


def video_filter(data: AEDataSpec) -> Optional[Callable[[str], bool]]:
    """include/exclude as a predicate on video ids, or None when every video is in."""
    if data.include is None and not data.exclude:
        return None
    return lambda video_id: _selected(video_id, data)


class ClipStream:
    """Batches of `batch_size` clips (uint8 (B, T, H, W, 3)) for one rank, streamed from a pixels prep dataset:
    every clip of the selected videos in the matching bucket, reshuffled each epoch, the same number of batches on
    every rank, with a position to save (`state_dict`) and restore. `fixed(n)`: n clips that are the same on every
    run with the same seed (epoch 0's first batches), for measuring before and after training."""

    def __init__(self, data: AEDataSpec, batch_size: int, rank: int, world: int, seed: int, prefetch: int = 2):
        _, names = pixel_buckets(data)
        self.dataset = ShardDataset(data.shards, batch_size, rank=rank, world_size=world, seed=seed,
                                    prefetch=prefetch, buckets=names, select=video_filter(data))
        self.clips = self.dataset.clips

    @staticmethod
    def _frames(batch: dict[str, Any]) -> torch.Tensor:
        return batch["latents"][:, 0].permute(0, 2, 3, 4, 1)          # (B, 1, 3, T, H, W) -> (B, T, H, W, 3)

    def next(self) -> torch.Tensor:
        return self._frames(next(self.dataset))

    def fixed(self, n: int) -> torch.Tensor:
        per_batch = self.dataset.batch_size
        batches = min(-(-n // per_batch), len(self.dataset))
        return torch.cat([self._frames(self.dataset.batch_at(0, i)) for i in range(batches)])[:n]

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)

    def describe(self) -> str:
        return self.dataset.describe()

    def close(self) -> None:
        self.dataset.close()


def _clips_from_shards(data: AEDataSpec, rank: int, world: int, limit: Optional[int]) -> ClipSet:
    folder = Path(data.shards)
    index, _ = pixel_buckets(data)
    want = [3, data.clip.num_frames, *data.resolution]
    frames, ids, order, shapes, videos = [], [], [], {}, set()
    position = -1
    for clip in sh.iter_clips(folder):
        shape = list(clip["latents"].shape)
        if shape != want or not _selected(clip["video_id"], data):
            key = "other_shape" if shape != want else "not_selected"
            shapes[key] = shapes.get(key, 0) + 1
            continue
        position += 1
        if limit is not None and position >= limit:
            break
        if position % world != rank:
            continue
        frames.append(torch.from_numpy(np.ascontiguousarray(clip["latents"])).permute(1, 2, 3, 0))   # (T, H, W, 3)
        ids.append(clip["clip_id"])
        order.append((position, int(clip["start_frame"])))
        videos.add(clip["video_id"])
    if position < 0:
        buckets = ", ".join(f"{k}: {v}" for k, v in index.get("latent", {}).get("shapes", {}).items())
        raise UserError(f"{folder}: data.shards: no clip of shape {want} (3 x clip.num_frames x resolution) among "
                        f"the selected videos; the dataset holds {buckets or 'no clips'}")
    stacked = torch.stack(frames) if frames else torch.empty((0, *want[1:], 3), dtype=torch.uint8)
    return ClipSet(stacked, ids, order, len(videos), {k: v for k, v in shapes.items()})

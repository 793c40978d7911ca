"""hpcvid.data.dataset: the training dataset over shards, on small datasets written with ShardWriter directly.

The reference dataset: 3 shards x 2 buckets, 12 videos of 2 to 5 consecutive clips (one with a gap in its run),
float16 latents, a PNG content picture per clip, one caption per video with 2 to 6 token states.
"""
from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import hpcvid.data.dataset as dataset_module
from hpcvid.config import UserError
from hpcvid.data import shards as sh
from hpcvid.data.dataset import ShardDataset, sequence_windows
from hpcvid.data.shard_file import ClipRecord, ShardReader, ShardWriter
from hpcvid.io import atomic_write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))    # test_shard_file's format-1 writer
from test_shard_file import write_v1  # noqa: E402

T = 4                                       # frames per clip
LATENT = (2, 2, 4, 4)                       # per-clip latent shape (float16)
BUCKETS = {"16x16": (16, 16), "16x24": (16, 24)}
D = 8                                       # token state width
SHARDS, VIDEOS_PER_SHARD = 3, 4


@dataclass
class Truth:
    """What was written, by clip id, to compare batches against."""
    latents: dict[str, np.ndarray]
    content: dict[str, np.ndarray]
    video: dict[str, str]
    start: dict[str, int]
    stride: dict[str, int]
    bucket: dict[str, str]
    caption: dict[str, str]
    states: dict[str, np.ndarray]           # by caption
    runs: list[list[str]]                   # clip ids of each run of consecutive clips


def video_plan(shard: int, v: int) -> tuple[str, int, list[int]]:
    """bucket, stride and the start frames of one video's clips: 2 to 5 back to back, one video with a gap."""
    stride = 1 + v % 2
    n = 2 + (shard + v) % 4
    starts = [i * T * stride for i in range(n)]
    if (shard, v) == (1, 2):                # a gap: clips 0..1 and 3..4 are two runs
        starts = [0, T * stride, 3 * T * stride, 4 * T * stride]
    return list(BUCKETS)[(shard + v) % 2], stride, starts


def write_dataset(folder: Path, seed: int = 0) -> Truth:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    truth = Truth({}, {}, {}, {}, {}, {}, {}, {}, [])
    identity = {"format": "hpcvid-dataset", "format_version": 2, "digest": "test-digest",
                "spec": {"clip": {"num_frames": T, "fps": None, "clips_per_video": 8, "layout": "consecutive"}},
                "total_rows": SHARDS * VIDEOS_PER_SHARD, "num_shards": SHARDS, "encoder": {"kind": "test"},
                "latent": {"dtype": "float16", "shapes": {name: list(LATENT) for name in BUCKETS}},
                "text": {"encoder": "test", "max_tokens": 6, "dim": D, "dtype": "float16"}}
    atomic_write_json(folder / "dataset.json", identity)
    for shard in range(SHARDS):
        name = sh.shard_name(shard)
        writer = ShardWriter(folder / f"{name}.h5", {"shard": shard})
        for v in range(VIDEOS_PER_SHARD):
            row = shard * VIDEOS_PER_SHARD + v
            video, caption = f"s{shard}v{v}", f"caption of video {row}"
            bucket, stride, starts = video_plan(shard, v)
            states = rng.standard_normal((2 + row % 5, D)).astype(np.float16)
            writer.add_caption(caption, states)
            truth.states[caption] = states
            latents = rng.standard_normal((len(starts), *LATENT)).astype(np.float16)
            pictures = rng.integers(0, 256, (len(starts), 3, *BUCKETS[bucket]), dtype=np.uint8)
            records = [ClipRecord(video, caption, row, s, stride, 12.0) for s in starts]
            writer.add(BUCKETS[bucket], latents, records, [writer.caption_row(caption)] * len(starts),
                       images={"content": pictures})
            ids = [f"{video}@{s}" for s in starts]
            for i, cid in enumerate(ids):
                truth.latents[cid], truth.content[cid] = latents[i], pictures[i]
                truth.video[cid], truth.start[cid], truth.stride[cid] = video, starts[i], stride
                truth.bucket[cid], truth.caption[cid] = bucket, caption
            run = [ids[0]]
            for prev, cid in zip(ids, ids[1:]):
                if truth.start[cid] != truth.start[prev] + T * stride:
                    truth.runs.append(run)
                    run = []
                run.append(cid)
            truth.runs.append(run)
        size = writer.commit()
        rows = VIDEOS_PER_SHARD
        atomic_write_json(folder / f"{name}.json", {
            "shard": shard, "file": f"{name}.h5", "rows_start": shard * rows, "rows_stop": (shard + 1) * rows,
            "rows": rows, "done": rows, "filtered": 0, "failed": 0, "clips": sum(writer.counts.values()),
            "bytes": size, "buckets": dict(writer.counts), "reasons": {"filtered": {}, "failed": {}},
            "failures": [], "seconds": 0.0})
    sh.rebuild_index(folder)
    return truth


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Truth]:
    """The reference dataset; read-only (tests that damage it work on a copy)."""
    folder = tmp_path_factory.mktemp("dataset") / "latents"
    return folder, write_dataset(folder)


def epoch_ids(folder: Path, world: int, batch_size: int, sequence: int = 1, seed: int = 0,
              prefetch: int = 2) -> list[list[list[str]]]:
    """Per rank, its first epoch's batches as clip-id lists (B lists of K)."""
    out = []
    for rank in range(world):
        with ShardDataset(folder, batch_size, rank=rank, world_size=world, sequence=sequence, seed=seed,
                          prefetch=prefetch) as ds:
            out.append([next(ds)["clip_ids"] for _ in range(len(ds))])
    return out


def take(ds: ShardDataset, n: int) -> list[list[list[str]]]:
    return [next(ds)["clip_ids"] for _ in range(n)]


# ---------------------------------------------------------------------------------------------------- order

@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_item_once_per_epoch_across_ranks_one_bucket_per_batch(data, world):
    folder, truth = data
    batch_size = 2
    per_rank = epoch_ids(folder, world, batch_size)
    assert len({len(batches) for batches in per_rank}) == 1                    # the same count on every rank
    seen = [seq[0] for batches in per_rank for batch in batches for seq in batch]
    assert len(seen) == len(set(seen))                                         # nothing twice
    per_bucket = {name: sum(b == name for b in truth.bucket.values()) for name in BUCKETS}
    g = batch_size * world
    dropped = sum(n % g for n in per_bucket.values())
    assert len(seen) == len(truth.latents) - dropped                           # all but the documented drop
    with ShardDataset(folder, batch_size, world_size=world) as ds:
        assert ds.dropped_per_epoch == dropped and len(ds) == sum(n // g for n in per_bucket.values())
    for j in range(len(per_rank[0])):                                          # a global batch: one bucket
        assert len({truth.bucket[seq[0]] for rank in range(world) for seq in per_rank[rank][j]}) == 1
        assert all(len(per_rank[rank][j]) == batch_size for rank in range(world))
    if world > 1:
        assert dropped > 0                                                     # the data exercise the drop


def test_order_is_a_function_of_seed_and_epoch(data):
    folder, _ = data
    with ShardDataset(folder, 3, seed=7, prefetch=0) as ds:
        first = take(ds, 2 * len(ds))
    assert epoch_ids(folder, 1, 3, seed=7, prefetch=3)[0] == first[:len(first) // 2]   # prefetch changes nothing
    def grouping(batches):
        return {frozenset(seq[0] for seq in batch) for batch in batches}

    # epoch 1 is another order: items meet in other batches, not just the batches in another order
    assert grouping(first[:len(first) // 2]) != grouping(first[len(first) // 2:])
    assert epoch_ids(folder, 1, 3, seed=8)[0] != first[:len(first) // 2]       # and another seed another


def test_buckets_take_turns_within_an_epoch(data):
    """The global batches are shuffled across buckets, not served one bucket after the other."""
    folder, truth = data
    with ShardDataset(folder, 2, prefetch=0) as ds:
        buckets = [truth.bucket[batch[0][0]] for batch in take(ds, len(ds))]
    assert set(buckets) == set(BUCKETS) and buckets != sorted(buckets) and buckets != sorted(buckets, reverse=True)


@pytest.mark.parametrize("k", [2, 3])
def test_sequences_are_consecutive_clips_of_one_video(data, k):
    folder, truth = data
    expected = sum(len(run) // k for run in truth.runs)
    with ShardDataset(folder, 1, sequence=k) as ds:
        assert ds.sequences == expected and ds.clips_outside_sequences == len(truth.latents) - k * expected
        sequences = [seq for batch in take(ds, len(ds)) for seq in batch]
    assert len(sequences) == expected                                          # batch 1, world 1: nothing dropped
    used = [cid for seq in sequences for cid in seq]
    assert len(used) == len(set(used))                                         # windows do not overlap
    for seq in sequences:
        assert len(seq) == k and len({truth.video[c] for c in seq}) == 1
        for a, b in zip(seq, seq[1:]):
            assert truth.start[b] == truth.start[a] + T * truth.stride[a]
        run = next(r for r in truth.runs if seq[0] in r)
        assert run.index(seq[0]) % k == 0                                      # windows from the run's start


@pytest.mark.parametrize("k", [1, 2])
def test_buckets_and_a_video_selection_keep_only_their_clips(data, k):
    """buckets= and select= narrow the dataset before windows are cut: sequences never cross into a dropped clip."""
    folder, truth = data
    keep = lambda video: not video.endswith("v1")                              # noqa: E731
    wanted = {cid for cid in truth.latents if truth.bucket[cid] == "16x24" and keep(truth.video[cid])}
    runs = [[c for c in run if c in wanted] for run in truth.runs]
    with ShardDataset(folder, 1, sequence=k, buckets=["16x24"], select=keep, prefetch=0) as ds:
        assert ds.clips == len(wanted) and ds.bucket_names == ["16x24"]
        assert ds.sequences == sum(len(run) // k for run in runs)
        seen = [cid for batch in take(ds, len(ds)) for seq in batch for cid in seq]
    assert set(seen) <= wanted and len(seen) == ds.sequences * k
    with pytest.raises(UserError, match="no clips to train on"):
        ShardDataset(folder, 1, select=lambda video: False)


def test_batch_at_reads_a_fixed_batch_without_moving_the_position(data):
    folder, _ = data
    with ShardDataset(folder, 2, seed=3) as ds:
        first = take(ds, 2)
        fixed = ds.batch_at(0, 1)["clip_ids"]
        after = take(ds, 1)
        assert fixed == first[1] and ds.state_dict()["items_seen"] == 3 * 2
    with ShardDataset(folder, 2, seed=3) as fresh:
        assert take(fresh, 3)[2] == after[0]                                   # the prefetched batches came again
        with pytest.raises(IndexError):
            fresh.batch_at(0, len(fresh))


def test_sequence_windows_function():
    ids = np.array(["b", "a", "a", "a", "b", "a", "a"], dtype=object)
    starts = np.array([4, 8, 0, 4, 0, 20, 12])                  # a: 0 4 8 12 | 20 (gap), b: 0 4
    windows, longest = sequence_windows(ids, starts, np.ones(7, np.int32), 4, 2)
    assert [[int(starts[i]) for i in w] for w in windows] == [[0, 4], [8, 12], [0, 4]] and longest == 4
    # a@4 with stride 2 belongs to no run: a's pairs are (8, 12) alone; b's (0, 4) stays
    assert sequence_windows(ids, starts, np.array([1, 1, 1, 2, 1, 1, 1]), 4, 2)[0].tolist() == [[1, 6], [4, 0]]
    assert sequence_windows(ids[:0], starts[:0], starts[:0], 4, 2)[0].shape == (0, 2)


# ---------------------------------------------------------------------------------------------------- contents

def test_batches_hold_the_stored_clips(data):
    folder, truth = data
    with ShardDataset(folder, 3, sequence=2, seed=1) as ds:
        batches = [next(ds) for _ in range(len(ds))]
    for batch in batches:
        h, w = map(int, batch["bucket"].split("x"))
        assert batch["latents"].shape == (3, 2, *LATENT) and str(batch["latents"].dtype) == "torch.float16"
        assert batch["content"].shape == (3, 2, 3, h, w) and str(batch["content"].dtype) == "torch.uint8"
        lengths = [len(truth.states[truth.caption[seq[0]]]) for seq in batch["clip_ids"]]
        assert batch["text_states"].shape == (3, max(lengths), D) and str(batch["text_states"].dtype) == \
            "torch.float16"
        assert batch["text_mask"].sum(1).tolist() == lengths                   # mask sums = token counts
        for b, seq in enumerate(batch["clip_ids"]):
            assert batch["captions"][b] == truth.caption[seq[0]]
            states = batch["text_states"][b].numpy()
            assert np.array_equal(states[:lengths[b]], truth.states[truth.caption[seq[0]]])
            assert not states[lengths[b]:].any() and not batch["text_mask"][b, lengths[b]:].any()
            for k, cid in enumerate(seq):
                assert truth.bucket[cid] == batch["bucket"]
                assert np.array_equal(batch["latents"][b, k].numpy(), truth.latents[cid])
                assert np.array_equal(batch["content"][b, k].numpy(), truth.content[cid])    # PNG: exact


def test_format_1_dataset_is_read(tmp_path):
    """A dataset of one format-1 shard (padded text states, raw pictures): the same batches."""
    folder = tmp_path / "old"
    folder.mkdir()
    n, L = 4, 5
    rng = np.random.default_rng(3)
    mask = np.arange(L)[None, :] < np.array([3, 3, 5, 2])[:, None]                       # (n, L)
    emb = (rng.standard_normal((n, L, D)) * mask[..., None]).astype(np.float16)
    pictures = rng.integers(0, 256, (n, 3, 16, 16), dtype=np.uint8)
    latents = rng.integers(0, 256, (n, 3, T, 16, 16), dtype=np.uint8)
    fields = {"latents": latents, "clip_id": ["a@0", "a@4", "b@0", "b@4"], "video_id": ["a", "a", "b", "b"],
              "caption": ["x", "x", "why", "why"], "text_emb": emb, "text_mask": mask,
              "row": np.array([0, 0, 1, 1]), "start_frame": np.array([0, 4, 0, 4]),
              "stride": np.ones(n, np.int32), "fps": np.full(n, 8.0, np.float32)}
    fields["text_emb"][3], fields["text_mask"][3] = emb[2], mask[2]                      # one caption, one state
    write_v1(folder / "shard-00000.h5", "16x16", fields, {"content": pictures})
    atomic_write_json(folder / "dataset.json", {
        "format": "hpcvid-dataset", "format_version": 1, "digest": "old", "total_rows": 2, "num_shards": 1,
        "spec": {"clip": {"num_frames": T}}, "encoder": {"kind": "pixels"},
        "latent": {"dtype": "uint8", "shapes": {"16x16": [3, T, 16, 16]}}})
    atomic_write_json(folder / "shard-00000.json", {
        "shard": 0, "file": "shard-00000.h5", "rows_start": 0, "rows_stop": 2, "rows": 2, "done": 2, "filtered": 0,
        "failed": 0, "clips": n, "bytes": (folder / "shard-00000.h5").stat().st_size, "buckets": {"16x16": n},
        "reasons": {"filtered": {}, "failed": {}}, "failures": [], "seconds": 0.0})
    sh.rebuild_index(folder)
    with ShardDataset(folder, 2, sequence=2, prefetch=0) as ds:
        assert (ds.sequences, len(ds)) == (2, 1)
        batch = next(ds)
    order = [0 if seq[0] == "a@0" else 2 for seq in batch["clip_ids"]]                  # first clip of each
    assert sorted(map(tuple, batch["clip_ids"])) == [("a@0", "a@4"), ("b@0", "b@4")]
    assert batch["latents"].dtype.is_floating_point is False and batch["latents"].shape == (2, 2, 3, T, 16, 16)
    for b, i in enumerate(order):
        assert np.array_equal(batch["latents"][b].numpy(), latents[i:i + 2])
        assert np.array_equal(batch["content"][b].numpy(), pictures[i:i + 2])
        assert batch["text_mask"][b].sum() == mask[i].sum()
        assert np.array_equal(batch["text_states"][b, :mask[i].sum()].numpy(), emb[i][mask[i]])


# ---------------------------------------------------------------------------------------------------- position

def test_resume_gives_the_batches_of_an_uninterrupted_run(data):
    folder, _ = data
    world, n = 2, 7
    runs = [ShardDataset(folder, 2, rank=r, world_size=world, seed=3, prefetch=2) for r in range(world)]
    per_epoch = len(runs[0])
    assert per_epoch < n + 4                                                   # the run crosses an epoch
    straight = [take(ds, n + 4) for ds in runs]
    for ds in runs:
        ds.close()
    states = []
    for r in range(world):
        with ShardDataset(folder, 2, rank=r, world_size=world, seed=3, prefetch=2) as ds:
            assert take(ds, n) == straight[r][:n]
            time.sleep(0.05)                                                   # let the thread run ahead
            states.append(ds.state_dict())
    assert states[0] == states[1]                                              # one position for all ranks
    assert states[0]["epoch"] == n // per_epoch and states[0]["items_seen"] == (n % per_epoch) * 2 * world
    for r in range(world):
        with ShardDataset(folder, 2, rank=r, world_size=world, seed=99, prefetch=2) as ds:   # the state's seed
            ds.load_state_dict(states[r])
            assert take(ds, 4) == straight[r][n:]
            assert ds.state_dict()["epoch"] == (n + 4) // per_epoch


def test_resume_with_another_world_size_continues_in_the_same_epoch(data):
    folder, _ = data
    with ShardDataset(folder, 2, world_size=2, seed=5, prefetch=0) as ds:
        take(ds, 3)
        state = ds.state_dict()
    assert (state["epoch"], state["items_seen"]) == (0, 12)
    with ShardDataset(folder, 2, rank=1, world_size=3, seed=5) as ds:
        ds.load_state_dict(state)
        assert (ds.epoch, ds.state_dict()["items_seen"]) == (0, 12)            # 12 is 2 global batches of 6
        resumed = take(ds, len(ds) - 2)
        assert ds.epoch == 1
    with ShardDataset(folder, 2, rank=1, world_size=3, seed=5) as ds:
        assert take(ds, len(ds))[2:] == resumed                                # the rest of epoch 0, in its order
    with ShardDataset(folder, 2, world_size=3, seed=5) as ds:                  # 14 seen: nearest boundary 12
        ds.load_state_dict({**state, "items_seen": 14})
        assert ds.state_dict()["items_seen"] == 12
        ds.load_state_dict({**state, "items_seen": 6 * len(ds) - 2})          # nearest is the epoch's end
        assert (ds.epoch, ds.state_dict()["items_seen"]) == (1, 0)


def test_a_state_for_other_data_is_refused(data):
    folder, _ = data
    with ShardDataset(folder, 2, sequence=2) as ds:
        state = ds.state_dict()
    with ShardDataset(folder, 2) as ds:
        with pytest.raises(UserError, match="sequence 2"):
            ds.load_state_dict(state)
        with pytest.raises(ValueError, match="items_seen"):
            ds.load_state_dict({"epoch": 0})


# ---------------------------------------------------------------------------------------------------- machinery

def test_open_files_stay_within_the_limit(data, monkeypatch):
    folder, _ = data
    live, most = set(), [0]

    class Counted(ShardReader):
        def __init__(self, path):
            super().__init__(path)
            live.add(self)
            most[0] = max(most[0], len(live))

        def close(self):
            live.discard(self)
            super().close()

    monkeypatch.setattr(dataset_module, "ShardReader", Counted)
    for limit in (1, 2):
        most[0] = 0
        with ShardDataset(folder, 4, sequence=2, open_files=limit) as ds:
            take(ds, 2 * len(ds))
        assert 1 <= most[0] <= limit and not live                              # all closed at the end
    with ShardDataset(folder, 4, open_files=3) as ds:
        take(ds, len(ds))
        assert most[0] == 3 == len(live)                                       # 3 shards: all open at once


def test_prefetch_errors_reach_the_consumer_and_close_stops_the_thread(data, monkeypatch):
    folder, _ = data
    calls = [0]
    real = ShardReader.read

    def failing(self, bucket, indices):
        calls[0] += 1
        if calls[0] > 3:
            raise OSError("disk gone")
        return real(self, bucket, indices)

    before = threading.active_count()
    with ShardDataset(folder, 1, prefetch=2) as ds:
        monkeypatch.setattr(ShardReader, "read", failing)
        next(ds)
        with pytest.raises(OSError, match="disk gone"):
            take(ds, 10)
        with pytest.raises(OSError, match="disk gone"):                        # again, not a silent end
            next(ds)
        position = ds.state_dict()["items_seen"]
    assert position == 3                                                       # the batches handed out
    assert threading.active_count() == before
    monkeypatch.setattr(ShardReader, "read", real)
    with ShardDataset(folder, 1, prefetch=2) as ds:                            # closed while the queue is full
        next(ds)
        time.sleep(0.05)
    assert threading.active_count() == before


def test_describe_and_len(data):
    folder, truth = data
    with ShardDataset(folder, 2, world_size=2, sequence=2) as ds:
        line = ds.describe()
    assert "\n" not in line and str(folder) in line
    assert f"{len(truth.latents)} clips, {ds.sequences} sequences of 2 clips" in line
    assert f"{len(ds)} batches of 2 per rank per epoch x 2 ranks" in line and "16x16" in line


# ---------------------------------------------------------------------------------------------------- errors

def test_errors_for_bad_folders(tmp_path, data):
    folder, _ = data

    def error(path, **kwargs) -> str:
        with pytest.raises(UserError) as err:
            ShardDataset(path, **{"batch_size": 2, **kwargs})
        message = str(err.value)
        assert "\n" not in message and str(path) in message
        return message

    (tmp_path / "empty").mkdir()
    assert "not an hpcvid dataset" in error(tmp_path / "empty")
    assert "not an hpcvid dataset" in error(tmp_path / "missing")
    no_index = tmp_path / "no_index"
    shutil.copytree(folder, no_index)
    (no_index / "index.json").unlink()
    assert "no index.json" in error(no_index)
    assert "no sequences of 6 consecutive clips" in error(folder, sequence=6)
    assert "fewer than the 1 one step needs" in error(folder, batch_size=30)
    assert "fewer than the 99" in error(folder, min_batches=99)

    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    (partial / "shard-00001.json").unlink()
    sh.rebuild_index(partial)
    assert "1 of 3 shards missing" in error(partial) and "allow_incomplete" in error(partial)
    with ShardDataset(partial, 2, allow_incomplete=True) as ds:
        with ShardDataset(folder, 2) as full:
            assert 0 < ds.clips < full.clips
        take(ds, len(ds))

    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    with open(changed / "shard-00002.h5", "ab") as f:
        f.write(b"\0")
    assert "index.json says" in error(changed)
    with pytest.raises(ValueError, match="rank"):
        ShardDataset(folder, 2, rank=2, world_size=2)

"""The training dataset over a prep dataset's shards: batches of clips, or of sequences of consecutive clips of one
video, streamed from HDF5 by index with bounded memory, the same number of batches on every rank.

    from hpcvid.data.dataset import ShardDataset

    with ShardDataset("data/latents", batch_size=8, rank=env.rank, world_size=env.world_size, sequence=4) as data:
        if saved:
            data.load_state_dict(saved)                  # continue where the checkpoint stopped
        for step, batch in zip(range(steps), data):      # infinite: epoch 0, 1, 2, ...
            batch["latents"]                             # (8, 4, *latent_shape) in the stored dtype
            state = data.state_dict()                    # the same on every rank: save it with the checkpoint

An epoch's order is a function of (seed, epoch) alone, so every rank computes the same one without talking to the
others: each bucket's sequences (a batch holds one bucket, so one shape) are shuffled, cut into global batches of
batch_size x world_size sequences (the incomplete last one dropped), and the list of global batches is shuffled;
rank r takes sequences [r*batch_size, (r+1)*batch_size) of each. Every rank must open the same dataset state (the
same complete shards): `state_dict()["sequences"]` lets a trainer check that across ranks.
"""
from __future__ import annotations

import collections
import hashlib
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Optional

import numpy as np
import torch

from hpcvid.config import UserError
from hpcvid.data.shard_file import ID_FIELDS, ShardFormatError, ShardReader
from hpcvid.io import read_json

OPEN_FILES = 8          # shard files kept open by default; each holds a few bytes per clip of cached offsets
_PER_CLIP = frozenset(ID_FIELDS) | {"latents", "bucket", "caption", "text_states"}   # not stacked as arrays
_STATE_KEYS = ("epoch", "items_seen", "seed", "sequence", "batch_size", "world_size", "dataset", "sequences")


# ---------------------------------------------------------------------------------------------------- sequences

def sequence_windows(video_ids: np.ndarray, start_frames: np.ndarray, strides: np.ndarray, num_frames: int,
                     length: int) -> tuple[np.ndarray, int]:
    """(W, length) int32 clip indices of the non-overlapping windows of `length` consecutive clips, and the longest
    run of consecutive clips. Clips are consecutive when they share a video and stride and the next one starts
    num_frames * stride frames after this one (what prep's consecutive layout writes); each run is cut into
    windows from its first clip on, the remainder (fewer than `length` clips) is in no window."""
    n = len(start_frames)
    if n == 0:
        return np.empty((0, length), np.int32), 0
    videos = np.unique(video_ids, return_inverse=True)[1].reshape(-1)
    order = np.lexsort((start_frames, videos))                                       # by video, then start
    video, start, stride = videos[order], start_frames[order].astype(np.int64), strides[order].astype(np.int64)
    follows = np.zeros(n, bool)                                                      # clip continues the one before
    follows[1:] = (video[1:] == video[:-1]) & (stride[1:] == stride[:-1]) & (
        start[1:] == start[:-1] + num_frames * stride[:-1])
    run = np.cumsum(~follows) - 1                                                    # (n,) run of each clip
    run_length = np.bincount(run)
    position = np.arange(n) - np.flatnonzero(~follows)[run]                          # place within its run
    first = np.flatnonzero((position % length == 0) & (position + length <= run_length[run]))
    return order[first[:, None] + np.arange(length)].astype(np.int32), int(run_length.max())


def _epoch_seed(seed: int, epoch: int) -> int:
    """One generator seed per (seed, epoch), well mixed: seeds 1 and 2 share nothing with epochs 1 and 2."""
    return int.from_bytes(hashlib.sha256(f"hpcvid-epoch:{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


def collate(sequences: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """B sequences of K clip dicts (ShardReader's) -> one batch: arrays stacked (B, K, ...) as torch tensors in
    their stored dtype, the first clip's token states padded to the longest (B, L, D) with a mask (B, L)."""
    first = sequences[0][0]
    batch_size, length = len(sequences), len(sequences[0])
    arrays = ["latents"] + [key for key, value in first.items()
                            if key not in _PER_CLIP and isinstance(value, np.ndarray)]   # pictures and extras
    batch: dict[str, Any] = {}
    for key in arrays:
        stacked = np.stack([clip[key] for seq in sequences for clip in seq])            # (B*K, ...)
        batch[key] = torch.from_numpy(stacked.reshape(batch_size, length, *stacked.shape[1:]))   # (B, K, ...)
    if "text_states" in first:
        states = [seq[0]["text_states"] for seq in sequences]                            # each (L_b, D)
        longest = max(len(s) for s in states)
        padded = np.zeros((batch_size, longest, states[0].shape[1]), np.float16)         # (B, L, D)
        mask = np.zeros((batch_size, longest), bool)                                     # (B, L)
        for b, s in enumerate(states):
            padded[b, :len(s)], mask[b, :len(s)] = s, True
        batch["text_states"], batch["text_mask"] = torch.from_numpy(padded), torch.from_numpy(mask)
    batch["clip_ids"] = [[clip["clip_id"] for clip in seq] for seq in sequences]
    batch["captions"] = [seq[0]["caption"] for seq in sequences]
    batch["bucket"] = first["bucket"]
    return batch


# ---------------------------------------------------------------------------------------------------- machinery

class _OpenShards:
    """At most `limit` shard files open, the least recently used closed first: file handles and the readers'
    cached offsets stay bounded for a dataset of any number of shards."""

    def __init__(self, paths: list[Path], entries: list[dict[str, Any]], latent_shapes: dict[str, list[int]],
                 limit: int):
        self.paths, self.entries, self.latent_shapes, self.limit = paths, entries, latent_shapes, limit
        self.open: collections.OrderedDict[int, ShardReader] = collections.OrderedDict()

    def get(self, shard: int) -> ShardReader:
        if shard in self.open:
            self.open.move_to_end(shard)
            return self.open[shard]
        while len(self.open) >= self.limit:
            self.open.popitem(last=False)[1].close()
        reader = ShardReader(self.paths[shard])
        try:
            self._check(reader, self.entries[shard])
        except BaseException:
            reader.close()
            raise
        self.open[shard] = reader
        return reader

    def _check(self, reader: ShardReader, entry: dict[str, Any]) -> None:
        """The file holds what index.json says (else indices would point at other clips) in the dataset's shapes."""
        if reader.buckets != entry["buckets"]:
            raise ShardFormatError(f"{reader.path}: holds clips per bucket {reader.buckets}, index.json says "
                                   f"{entry['buckets']}; rebuild the index (hpcvid inspect)")
        for name, shape in reader.latent_shapes.items():
            if name in self.latent_shapes and shape != list(self.latent_shapes[name]):
                raise ShardFormatError(f"{reader.path}: clips/{name}/latents: shape {shape}, dataset.json says "
                                       f"{self.latent_shapes[name]}")

    def close(self) -> None:
        while self.open:
            self.open.popitem()[1].close()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class _Inline:
    """prefetch 0: batches made in the caller's thread when asked. A generator that raised is finished: its error
    is raised again on every later call (not a StopIteration, which would end a for loop as if the data had)."""

    def __init__(self, items: Iterator[Any]):
        self.items = items
        self.failure: Optional[BaseException] = None

    def get(self) -> Any:
        if self.failure is None:
            try:
                return next(self.items)
            except BaseException as e:      # noqa: BLE001 - kept and raised again below
                self.failure = e
        raise self.failure

    def close(self) -> None:
        self.items.close()


class _Prefetcher:
    """A daemon thread that keeps `depth` items ready in a bounded queue; its exception is raised in the caller
    (every later call too), and close() stops it between two items."""

    def __init__(self, items: Iterator[Any], depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.failure: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(items,), name="hpcvid-prefetch", daemon=True)
        self.thread.start()

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    break
        except BaseException as e:      # noqa: BLE001 - handed to the consumer, who raises it
            self._put(_Failed(e))
        finally:
            items.close()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> Any:
        while self.failure is None:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("the prefetch thread ended without a batch") from None
                continue
            if not isinstance(item, _Failed):
                return item
            self.failure = item.error
        raise self.failure

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():          # a full queue: make room so the thread sees the stop
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self.thread.join()


# ---------------------------------------------------------------------------------------------------- the dataset

class ShardDataset:
    """Batches for one rank, forever (epoch 0, 1, ...), from a prep dataset's complete shards (format 1 or 2).

    An item is a sequence of `sequence` consecutive clips of one video (sequence=1: a clip). A batch is a dict:
        latents          (B, K, *latent_shape) tensor, stored dtype (float16 latents stay float16; the trainer casts)
        <picture name>   (B, K, 3, H, W) uint8 tensor per picture (e.g. "content"); other extras (B, K, ...)
        text_states      (B, L, D) float16, the first clip's caption states, zero past the caption (L: the batch's
        text_mask        (B, L) bool        longest caption); both absent when the dataset has no text states
        clip_ids         B lists of K clip ids;  captions: B str (the first clip's);  bucket: "HxW"
    B = batch_size, K = sequence.

    What an epoch drops: every bucket's last incomplete global batch, n_b mod (batch_size x world_size) of its n_b
    sequences (fewer than one global batch per bucket; a different random subset each epoch); and, every epoch the
    same, the clips in no window of K (`clips_outside_sequences`). `dropped_per_epoch` counts the first.

    Position: `state_dict()` = {epoch, items_seen (global sequences consumed in this epoch), seed, sequence,
    batch_size, world_size, dataset (digest), sequences}, the same on every rank, counting batches the caller took
    (not those prefetched). `load_state_dict` continues exactly where it stopped when batch_size x world_size is
    unchanged; otherwise from the same epoch at the global batch boundary nearest to items_seen in the new
    layout (the next epoch when that is the epoch's end; which sequences of the epoch are then seen twice or not
    at all is not controlled). The seed comes from the state: a resumed run keeps its order.

    Selection: `buckets` keeps only those buckets (e.g. the one shape a model takes); `select(video_id) -> bool`
    keeps only the clips of the videos it accepts (include/exclude patterns), which reads every clip's video id
    once at start, like sequences do.

    Memory: per rank, a few int32 per sequence for the index, one epoch's order (8 bytes a sequence), `open_files`
    shard readers and `prefetch` batches. Random access crosses shards: a larger `open_files` helps when the
    shards are few enough to keep open.
    """

    def __init__(self, folder: str | Path, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 sequence: int = 1, seed: int = 0, prefetch: int = 2, open_files: int = OPEN_FILES,
                 allow_incomplete: bool = False, min_batches: int = 1, buckets: Optional[Collection[str]] = None,
                 select: Optional[Callable[[str], bool]] = None):
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                 ("sequence", sequence, 1), ("prefetch", prefetch, 0), ("open_files", open_files, 1),
                                 ("min_batches", min_batches, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.folder, self.batch_size, self.rank, self.world_size = Path(folder), batch_size, rank, world_size
        self.sequence, self.seed, self.prefetch = sequence, int(seed), prefetch
        self.global_batch = batch_size * world_size
        identity, entries = self._read_folder(allow_incomplete)
        self.digest = identity.get("digest", "")
        self._paths = [self.folder / e["file"] for e in entries]
        self._keep_bucket = (lambda name: True) if buckets is None else frozenset(buckets).__contains__
        self._index_sequences(identity, entries, select)
        self._shards = _OpenShards(self._paths, entries, (identity.get("latent") or {}).get("shapes", {}), open_files)
        self._check_enough(min_batches)
        self._epoch, self._batch = 0, 0                 # the next batch the caller gets
        self._source: Optional[_Inline | _Prefetcher] = None
        self._closed = False
        self._order: tuple[tuple[int, int], np.ndarray] = ((-1, -1), np.empty((0, self.global_batch), np.int64))

    # ------------------------------------------------------------------------------------------------ building

    def _read_folder(self, allow_incomplete: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """dataset.json and the complete shards of index.json, each still the size the index recorded."""
        identity = read_json(self.folder / "dataset.json")
        if not isinstance(identity, dict) or identity.get("format") != "hpcvid-dataset":
            raise UserError(f"{self.folder}: not an hpcvid dataset (no dataset.json); make one with hpcvid prep")
        index = read_json(self.folder / "index.json")
        if not isinstance(index, dict) or "shards" not in index:
            raise UserError(f"{self.folder}: no index.json (no prep run has finished here); `hpcvid inspect "
                            f"{self.folder}` rebuilds it from the completed shards")
        missing = int(index["num_shards"]) - len(index["shards"])
        if missing and not allow_incomplete:
            raise UserError(f"{self.folder}: incomplete dataset: {missing} of {index['num_shards']} shards missing "
                            f"(prep unfinished or failed); finish prep, or pass allow_incomplete=True to train on the "
                            f"{len(index['shards'])} complete shards")
        for entry in index["shards"]:
            path = self.folder / entry["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != entry["bytes"]:
                raise UserError(f"{path}: {'missing' if size is None else f'{size} bytes'}, index.json says "
                                f"{entry['bytes']} bytes: the shard changed after the index was built; rerun prep")
        return identity, list(index["shards"])

    def _index_sequences(self, identity: dict[str, Any], entries: list[dict[str, Any]],
                         select: Optional[Callable[[str], bool]]) -> None:
        """Every sequence as (shard, bucket, K clip indices), grouped by bucket; `clips` counts the kept buckets'
        clips (of the selected videos).

        sequence=1 without `select` needs only index.json. Longer sequences need every clip's video_id, start_frame
        and stride (a selection, its video_id):
        read here once from every shard, on every rank. At 10M clips that is one open of each shard and ~0.4 GB of
        small datasets read (~30 bytes of id string and 12 bytes of numbers a clip), held one shard at a time;
        what stays is 4K+4 bytes a sequence. It could be cached beside index.json, keyed by the dataset digest."""
        num_frames = None
        if self.sequence > 1:
            num_frames = ((identity.get("spec") or {}).get("clip") or {}).get("num_frames")
            if not isinstance(num_frames, int):
                raise UserError(f"{self.folder / 'dataset.json'}: spec.clip.num_frames missing: sequences of clips "
                                f"need the clip length")
        windows: dict[str, list[tuple[int, np.ndarray]]] = collections.defaultdict(list)   # bucket -> (shard, (W, K))
        self.longest_run, self.clips = 0, 0
        for shard, entry in enumerate(entries):
            kept = [name for name in entry["buckets"] if self._keep_bucket(name)]
            if num_frames is None and select is None:
                for name in kept:
                    n = int(entry["buckets"][name])
                    windows[name].append((shard, np.arange(n, dtype=np.int32)[:, None]))
                    self.clips += n
                    self.longest_run = max(self.longest_run, 1 if n else 0)
                continue
            if not kept:
                continue
            with ShardReader(self._paths[shard]) as reader:
                for name in kept:
                    ids = reader.ids(name, ("video_id", "start_frame", "stride"))
                    chosen = np.arange(len(ids["video_id"]))                                # (n,) clip indices
                    if select is not None:
                        videos, inverse = np.unique(ids["video_id"], return_inverse=True)
                        chosen = np.flatnonzero(np.array([bool(select(v)) for v in videos], bool)[inverse.reshape(-1)])
                    self.clips += len(chosen)
                    if num_frames is None:
                        found, longest = chosen[:, None], 1 if len(chosen) else 0
                    else:
                        found, longest = sequence_windows(ids["video_id"][chosen], ids["start_frame"][chosen],
                                                          ids["stride"][chosen], num_frames, self.sequence)
                        found = chosen[found]
                    windows[name].append((shard, found.astype(np.int32)))
                    self.longest_run = max(self.longest_run, longest)
        self.bucket_names = sorted(windows)
        shards, clips, counts = [], [], []
        for name in self.bucket_names:
            shards += [np.full(len(found), shard, np.int32) for shard, found in windows[name]]
            clips += [found for _, found in windows[name]]
            counts.append(sum(len(found) for _, found in windows[name]))
        self._seq_shard = np.concatenate(shards) if shards else np.empty(0, np.int32)                     # (M,)
        self._seq_clips = np.concatenate(clips) if clips else np.empty((0, self.sequence), np.int32)      # (M, K)
        self._bucket_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)                    # (nb+1,)
        self.bucket_sequences = dict(zip(self.bucket_names, counts))
        self.sequences = len(self._seq_shard)
        self.clips_outside_sequences = self.clips - self.sequences * self.sequence

    def _check_enough(self, min_batches: int) -> None:
        g = self.global_batch
        self.batches_per_epoch = sum(n // g for n in self.bucket_sequences.values())
        self.dropped_per_epoch = sum(n % g for n in self.bucket_sequences.values())
        if self.clips == 0:
            raise UserError(f"{self.folder}: no clips to train on: none in the chosen buckets or of the selected "
                            f"videos")
        if self.sequences == 0:
            raise UserError(f"{self.folder}: no sequences of {self.sequence} consecutive clips in {self.clips} clips "
                            f"(the longest run of one video is {self.longest_run}); prep with clip.layout: "
                            f"consecutive and clips_per_video >= {self.sequence}, or use a shorter sequence")
        if self.batches_per_epoch < min_batches:
            largest = max(self.bucket_sequences.values())
            raise UserError(f"{self.folder}: {self.sequences} sequences in {len(self.bucket_sequences)} buckets "
                            f"(the largest {largest}) make {self.batches_per_epoch} global batches of batch_size "
                            f"{self.batch_size} x {self.world_size} ranks = {g}, fewer than the {min_batches} one "
                            f"step needs; lower the batch size or add data")

    # ------------------------------------------------------------------------------------------------ order

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, batch_size x world_size) sequence ids of one epoch's global batches, from
        (seed, epoch) alone. A bucket's shuffle does not depend on the world size; the cut into batches does."""
        if self._order[0] == (self.seed, epoch):
            return self._order[1]
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        g, parts = self.global_batch, []
        for lo, hi in zip(self._bucket_start[:-1].tolist(), self._bucket_start[1:].tolist()):
            shuffled = lo + torch.randperm(hi - lo, generator=generator).numpy()           # (n_b,)
            parts.append(shuffled[:(hi - lo) // g * g].reshape(-1, g))                     # (n_b // g, g)
        order = np.concatenate(parts)
        order = order[torch.randperm(len(order), generator=generator).numpy()]             # (batches, g)
        self._order = ((self.seed, epoch), order)
        return order

    def batch_at(self, epoch: int, index: int) -> dict[str, Any]:
        """This rank's batch `index` of epoch `epoch`, read now without moving the position: fixed clips (e.g. the
        ones a trainer measures before and after training), the same on every run with the same seed. Batches
        prefetched so far are dropped (the reader is not shared between threads) and read again when due."""
        self._stop()
        order = self.epoch_order(epoch)
        if not 0 <= index < len(order):
            raise IndexError(f"batch {index} of an epoch of {len(order)} batches")
        return self._read(order[index, self.rank * self.batch_size:(self.rank + 1) * self.batch_size])

    def _produce(self, epoch: int, batch: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(epoch, batch index, batch) for this rank from a position on, forever."""
        while True:
            order = self.epoch_order(epoch)
            for j in range(batch, len(order)):
                yield epoch, j, self._read(order[j, self.rank * self.batch_size:(self.rank + 1) * self.batch_size])
            epoch, batch = epoch + 1, 0

    def _read(self, sequences: np.ndarray) -> dict[str, Any]:
        """One batch: its clips read shard by shard (one read per shard), in batch order."""
        bucket = self.bucket_names[int(np.searchsorted(self._bucket_start, sequences[0], side="right")) - 1]
        clips: list[list[Any]] = [[None] * self.sequence for _ in sequences]
        wanted: dict[int, list[tuple[int, int, int]]] = collections.defaultdict(list)     # shard -> (b, k, index)
        for b, s in enumerate(sequences.tolist()):
            for k, index in enumerate(self._seq_clips[s].tolist()):
                wanted[int(self._seq_shard[s])].append((b, k, index))
        for shard in sorted(wanted):
            got = self._shards.get(shard).read(bucket, [index for _, _, index in wanted[shard]])
            for (b, k, _), clip in zip(wanted[shard], got):
                clips[b][k] = clip
        return collate(clips)

    # ------------------------------------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank."""
        return self.batches_per_epoch

    def __iter__(self) -> "ShardDataset":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError(f"{self.folder}: the dataset is closed")
        if self._source is None:
            items = self._produce(self._epoch, self._batch)
            self._source = _Prefetcher(items, self.prefetch) if self.prefetch else _Inline(items)
        epoch, batch, out = self._source.get()
        if (epoch, batch) != (self._epoch, self._batch):
            raise RuntimeError(f"batch {epoch}:{batch} arrived where {self._epoch}:{self._batch} was due")   # a bug
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return out

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches handed out so far (not those prefetched): the same on every rank."""
        return {"epoch": self._epoch, "items_seen": self._batch * self.global_batch, "seed": self.seed,
                "sequence": self.sequence, "batch_size": self.batch_size, "world_size": self.world_size,
                "dataset": self.digest, "sequences": self.sequences}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict() (see the class docstring for a changed batch_size x world_size)."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"data position: missing {missing} (expected the keys of ShardDataset.state_dict())")
        if state["dataset"] != self.digest or state["sequence"] != self.sequence:
            raise UserError(f"{self.folder}: the saved data position is for dataset {state['dataset']} with sequence "
                            f"{state['sequence']}, not this dataset ({self.digest}) with sequence {self.sequence}; "
                            f"resume with the same data, or start a new run")
        self._stop()
        self.seed = int(state["seed"])
        g = self.global_batch
        epoch, batch = int(state["epoch"]), (int(state["items_seen"]) + g // 2) // g   # exact when g is unchanged
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self._epoch, self._batch = epoch, batch

    # ------------------------------------------------------------------------------------------------ summary, end

    def describe(self) -> str:
        plural = "s" if self.sequence > 1 else ""
        buckets = ", ".join(f"{name} {n}" for name, n in self.bucket_sequences.items())
        return (f"{self.folder}: {self.clips} clips, {self.sequences} sequences of {self.sequence} clip{plural} "
                f"({buckets}), {self.batches_per_epoch} batches of {self.batch_size} per rank per epoch x "
                f"{self.world_size} ranks, {self.dropped_per_epoch} sequences dropped per epoch")

    def _stop(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None

    def close(self) -> None:
        """Stop the prefetch thread, then close the shard files (the thread reads them)."""
        self._stop()
        self._shards.close()
        self._closed = True

    def __enter__(self) -> "ShardDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

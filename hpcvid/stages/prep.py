"""The prep stage: manifest rows -> decoded clips -> encoder latents + caption embeddings -> HDF5 shards.

Launch (the stage itself does not know which was used):
    hpcvid prep jobs/quickstart_prep.yaml                         # one process
    mpiexec -n 4 hpcvid prep jobs/quickstart_prep.yaml            # shards split over MPI ranks
    sbatch --array=0-63%16 ... hpcvid prep JOB.yaml               # shards split over array tasks (and their ranks)

Work is split by shard: worker w of W (ranks x array tasks) takes shards w, w+W, ...; a shard already complete is
skipped, so a rerun after a crash or preemption finishes only what is missing. Inside a worker, decoding runs
ahead in a pool while the main thread encodes, so end-to-end speed approaches the slower of the two.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

import hpcvid
from hpcvid.config import PrepSpec, digest, to_dict
from hpcvid.data import manifest as mf
from hpcvid.data import shards as sh
from hpcvid.data.shard_file import ClipRecord, ShardWriter, bucket_name
from hpcvid.data.video import VideoError, read_clips
from hpcvid.dist import Comm, Env, make_comm, rank_cores
from hpcvid.io import atomic_write_json, read_json
from hpcvid.stages.encoders import build_prep_encoder, load_text_encoder


@dataclass
class PrepResult:
    output: str
    shards_total: int
    shards_written: int          # by this worker in this run
    shards_skipped: int          # already complete before this run
    written: list[int]           # the shard numbers this worker wrote in this run
    rows: int                    # rows this worker processed in this run
    clips: int
    seconds: float
    setup_seconds: float         # manifest count, model loading, dataset claim (before the first row)
    complete: bool               # every shard of the dataset is complete (as seen by this worker's last index)
    summary: str


# ---------------------------------------------------------------------------------------------------- stage

def run(spec: PrepSpec, env: Env, comm: Optional[Comm] = None) -> PrepResult:
    """Write this worker's share of the dataset, then (main rank) rebuild the index and summarise."""
    comm = comm or make_comm(env)
    start = time.time()
    torch.set_num_threads(spec.torch_threads or encoder_threads(env, spec.decode_workers))
    out = Path(spec.output)
    encoder = build_prep_encoder(spec.encoder)
    total_rows = mf.count_rows(spec.manifest)
    total_shards = mf.num_shards(total_rows, spec.shards.rows_per_shard)
    text_encoder = load_text_encoder(spec.text, spec.encoder.device)
    identity = _identity(spec, encoder, text_encoder, total_rows, total_shards)
    sh.claim_dataset(out, identity)

    setup_seconds = time.time() - start
    mine = mf.shards_for_worker(total_shards, env.worker_index, env.num_workers)
    todo = [s for s in mine if sh.shard_done(out, s) is None]
    rows = _rows_by_shard(spec, set(todo))
    context = _ShardContext(spec, env, encoder, text_encoder, total_rows, identity["digest"])
    written_rows = written_clips = 0
    bar = tqdm(total=sum(len(rows[s]) for s in todo), unit="row", desc=f"prep {env.describe()}",
               position=env.rank if env.world_size > 1 else None, disable=not spec.progress, leave=True,
               dynamic_ncols=True, mininterval=1.0)
    with cf.ThreadPoolExecutor(spec.decode_workers, thread_name_prefix="decode") as pool:
        for shard in todo:
            marker = context.write_shard(shard, rows[shard], pool, bar)
            written_rows += marker["rows"]
            written_clips += marker["clips"]
    bar.close()

    comm.barrier()      # ranks of one job finish together; array tasks each rebuild when they finish
    index = sh.rebuild_index(out) if env.is_main else None
    totals = comm.all_reduce(np.array([len(todo), len(mine) - len(todo), written_rows, written_clips]))
    seconds = time.time() - start
    index = index or read_json(out / "index.json")   # other ranks: rebuilt by rank 0 before the all_reduce
    summary = format_summary(out, index, env, totals.tolist(), seconds, setup_seconds) if index else ""
    if env.is_main:
        print(summary, flush=True)
    return PrepResult(str(out), total_shards, len(todo), len(mine) - len(todo), todo, written_rows, written_clips,
                      round(seconds, 3), round(setup_seconds, 3), bool(index and index["complete"]), summary)


def encoder_threads(env: Env, decode_workers: int) -> int:
    """Cores left for torch after the decode threads: oversubscribing 2 cores halved end-to-end throughput."""
    return max(1, rank_cores(env) - decode_workers)


def _identity(spec: PrepSpec, encoder, text_encoder, total_rows: int, total_shards: int) -> dict[str, Any]:
    """What determines the dataset's content; a rerun with a different identity into the same folder is refused."""
    parts = {
        "manifest": to_dict(spec.manifest), "clip": to_dict(spec.clip), "buckets": [list(b) for b in spec.buckets],
        "text": {"encoder": spec.text.encoder, "max_tokens": spec.text.max_tokens},
        "encoder": {**encoder.config(), "digest": encoder.digest()},
        "shards": to_dict(spec.shards),
    }
    return {
        "format": "hpcvid-dataset", "format_version": sh.DATASET_FORMAT_VERSION, "hpcvid_version": hpcvid.__version__,
        "digest": digest(parts), "spec": parts, "total_rows": total_rows, "num_shards": total_shards,
        "encoder": parts["encoder"], "created": time.time(),
        "latent": {"dtype": encoder.latent_dtype(),
                   "shapes": {bucket_name(b): list(encoder.latent_shape(spec.clip.num_frames, b))
                              for b in spec.buckets}},
        "text": None if text_encoder is None else {"encoder": spec.text.encoder, "max_tokens": spec.text.max_tokens,
                                                   "dim": text_encoder.dim, "dtype": "float16"},
    }


def _rows_by_shard(spec: PrepSpec, shards: set[int]) -> dict[int, list[mf.Row]]:
    rows: dict[int, list[mf.Row]] = {s: [] for s in shards}
    rps = spec.shards.rows_per_shard
    for row in mf.iter_manifest(spec.manifest, keep=lambda i: mf.shard_of(i, rps) in shards):
        rows[mf.shard_of(row.index, rps)].append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- one shard

class _ShardContext:
    """Writes one shard at a time: decode ahead in the pool, encode in batches of one bucket, record every row."""

    def __init__(self, spec: PrepSpec, env: Env, encoder, text_encoder, total_rows: int, dataset_digest: str):
        self.spec, self.env, self.encoder, self.text_encoder = spec, env, encoder, text_encoder
        self.total_rows, self.dataset_digest = total_rows, dataset_digest
        self.clips_before = self.failed_before = 0     # earlier shards of this run, for the progress bar
        self.out = Path(spec.output)

    def _decode(self, path: Path):
        clip = self.spec.clip
        return read_clips(path, clip.num_frames, clip.fps, clip.clips_per_video, self.spec.buckets,
                          backend=self.spec.decode_backend, layout=clip.layout)

    def _decoded(self, rows: list[mf.Row], pool: cf.Executor) -> Iterator[tuple[mf.Row, Optional[Path], Any]]:
        """(row, path, clips | RowProblem | exception) in row order, with decoding `2 x workers` rows ahead."""
        pending: collections.deque = collections.deque()
        ahead = 2 * self.spec.decode_workers
        for row in rows:
            path, problem = mf.check_row(row, self.spec.manifest)
            pending.append((row, path, problem if problem else pool.submit(self._decode, path)))
            while len(pending) > ahead:
                yield _resolve(*pending.popleft())
        while pending:
            yield _resolve(*pending.popleft())

    def write_shard(self, shard: int, rows: list[mf.Row], pool: cf.Executor, bar: tqdm) -> dict[str, Any]:
        start = time.time()
        sh.clear_partial(self.out, shard)
        name = sh.shard_name(shard)
        rows_range = mf.shard_rows(shard, self.total_rows, self.spec.shards.rows_per_shard)
        if [r.index for r in rows] != list(rows_range):
            raise RuntimeError(f"{name}: manifest gave rows {rows[:1]}.. for {rows_range}")   # a bug, not input
        attrs = {"shard": shard, "rows_start": rows_range.start, "rows_stop": rows_range.stop,
                 "encoder": self.encoder.name, "encoder_config": self.encoder.config(),
                 "encoder_digest": self.encoder.digest(), "text_encoder": self.spec.text.encoder,
                 "dataset_digest": self.dataset_digest}
        shards_spec = self.spec.shards
        writer = ShardWriter(self.out / f"{name}.h5", attrs, shards_spec.compression, shards_spec.image_codec,
                             shards_spec.image_quality)
        stats = {"done": 0, "filtered": 0, "failed": 0, "clips": 0}
        reasons: dict[str, dict[str, int]] = {"filtered": {}, "failed": {}}
        failures: list[dict[str, Any]] = []
        warnings: dict[str, int] = {}               # code -> notes (a row may have several, e.g. one per VFR clip)
        warning_details: list[dict[str, Any]] = []
        batches: dict[tuple[int, int], list] = collections.defaultdict(list)
        try:
            for row, path, outcome in self._decoded(rows, pool):
                if isinstance(outcome, mf.RowProblem):
                    stats[outcome.status] += 1
                    reasons[outcome.status][outcome.reason] = reasons[outcome.status].get(outcome.reason, 0) + 1
                    if outcome.status == "failed":
                        failures.append({"row": row.index, "video_id": row.video_id, "shard": shard,
                                         "path": str(path or (row.candidates[0] if row.candidates else "")),
                                         "reason": outcome.reason, "detail": outcome.detail})
                else:
                    stats["done"] += 1
                    for code, detail in outcome.notes:
                        warnings[code] = warnings.get(code, 0) + 1
                        warning_details.append({"row": row.index, "video_id": row.video_id, "shard": shard,
                                                "path": str(path), "code": code, "detail": detail})
                    for clip in outcome.clips:
                        record = ClipRecord(row.video_id, row.caption, row.index, clip.start, clip.stride, clip.fps)
                        batches[clip.bucket].append((clip.frames, record))
                        if len(batches[clip.bucket]) >= self.spec.batch_size:
                            stats["clips"] += self._flush(writer, clip.bucket, batches.pop(clip.bucket))
                bar.update(1)
                pending = sum(len(b) for b in batches.values())
                bar.set_postfix(clips=self.clips_before + stats["clips"] + pending,
                                failed=self.failed_before + stats["failed"], refresh=False)
            for bucket in list(batches):
                stats["clips"] += self._flush(writer, bucket, batches.pop(bucket))
            size = writer.commit()
        except BaseException:
            writer.abort()
            raise
        marker = {"shard": shard, "file": f"{name}.h5", "rows_start": rows_range.start, "rows_stop": rows_range.stop,
                  "rows": len(rows), **stats, "bytes": size, "buckets": dict(writer.counts), "reasons": reasons,
                  "failures": failures, "warnings": warnings, "warning_details": warning_details,
                  "field_bytes": writer.field_bytes, "seconds": round(time.time() - start, 3),
                  "host": socket.gethostname(), "worker": self.env.describe(), "finished": time.time()}
        if len(rows) != stats["done"] + stats["filtered"] + stats["failed"]:
            raise RuntimeError(f"{name}: row accounting broke ({len(rows)} rows vs {stats})")   # a bug, not input
        atomic_write_json(self.out / f"{name}.json", marker)   # the completion marker, last
        self.clips_before += stats["clips"]
        self.failed_before += stats["failed"]
        return marker

    def _flush(self, writer: ShardWriter, bucket: tuple[int, int], batch: list) -> int:
        frames = np.stack([f for f, _ in batch])                          # (B, T, H, W, 3) uint8
        records = [r for _, r in batch]
        encoded = self.encoder.encode(frames)
        self._store_captions(writer, [r.caption for r in records])
        text_rows = [writer.caption_row(r.caption) for r in records]
        writer.add(bucket, encoded.latents, records, text_rows, encoded.extras, encoded.images)
        return len(records)

    def _store_captions(self, writer: ShardWriter, captions: list[str]) -> None:
        """Each caption new to this shard, once, with its unpadded token states: the text encoder runs once per
        distinct caption (all clips of a video share one), not once per clip."""
        new = list(dict.fromkeys(c for c in captions if writer.caption_row(c) is None))
        if self.text_encoder is None:
            for caption in new:
                writer.add_caption(caption)
            return
        step = self.spec.text.batch_size
        for i in range(0, len(new), step):
            chunk = new[i:i + step]
            states, mask = self.text_encoder(chunk)                        # (b, L, D), (b, L)
            states, mask = states.float().cpu().numpy(), mask.cpu().numpy()
            for caption, s, m in zip(chunk, states, mask):
                writer.add_caption(caption, s[m])                          # (L_i, D): the caption's own tokens


@dataclass
class _Decoded:
    clips: list
    notes: tuple[tuple[str, str], ...]      # (code, detail): what the reader could not trust, VFR clips


def _resolve(row: mf.Row, path: Optional[Path], outcome: Any):
    """Wait for a decode; any error of one video becomes that row's failure, never the stage's."""
    if not isinstance(outcome, cf.Future):
        return row, path, outcome
    try:
        info, clips = outcome.result()
        return row, path, _Decoded(clips, info.notes)
    except VideoError as e:
        return row, path, mf.RowProblem("failed", e.reason, f"row {row.index} ({row.video_id}): {e}")
    except Exception as e:   # noqa: BLE001 - a decoder bug on one file must not stop a 10M-row job
        return row, path, mf.RowProblem("failed", "decode_error",
                                        f"row {row.index} ({row.video_id}): {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------------- summary

def progress(spec: PrepSpec) -> str:
    """Shards complete out of the dataset's total, from the markers on disk (for `hpcvid status`)."""
    out = Path(spec.output)
    identity = read_json(out / "dataset.json")
    if identity is None:
        return "not started"
    done = sum(1 for s in range(identity["num_shards"]) if sh.shard_done(out, s) is not None)
    return f"{done}/{identity['num_shards']} shards"


def format_summary(out: Path, index: dict[str, Any], env: Env, run_totals: list[int], seconds: float,
                   setup_seconds: float) -> str:
    written, skipped, rows, clips = run_totals
    t = index["totals"]
    work = max(seconds - setup_seconds, 1e-9)
    lines = [
        f"prep: {out}  (encoder {index['encoder']['kind']}, {index['num_shards']} shards, "
        f"{index['total_rows']} manifest rows)",
        f"  this run ({env.num_workers} worker{'s' if env.num_workers > 1 else ''}"
        f"{'' if env.num_workers == env.world_size else ', this array task: ' + env.describe()}): "
        f"{written} shards written, {skipped} already complete; {rows} rows, {clips} clips in {seconds:.1f} s "
        f"({clips / work:.1f} clips/s after {setup_seconds:.1f} s of set-up)",
        f"  dataset: {index['complete_shards']}/{index['num_shards']} shards complete; rows {t['rows']} = "
        f"done {t['done']} + filtered {t['filtered']} + failed {t['failed']}; clips {t['clips']}; "
        f"{human_bytes(t['bytes'])}",
    ]
    for status in ("failed", "filtered"):
        if index["reasons"][status]:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(index["reasons"][status].items(), key=lambda kv: -kv[1]))
            where = f"   (details: {out / 'failures.jsonl'})" if status == "failed" else ""
            lines.append(f"  {status}: {counts}{where}")
    if index.get("warnings"):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(index["warnings"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  warnings (clips kept): {counts}   (details: {out / 'warnings.jsonl'})")
    if not index["complete"]:
        lines.append("  incomplete: the other array tasks write the rest" if (env.array_task_count or 1) > 1
                     else "  incomplete: rerun the same command to finish the missing shards")
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"

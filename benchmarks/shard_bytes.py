"""Shard bytes per clip by field: format 2 against format 1 and against per-frame image latents, in one run.

    python benchmarks/shard_bytes.py [--clips-per-caption 1] [--out benchmarks/results/shard_bytes.json]

Two settings, each written for real through hpcvid's ShardWriter (format 2, PNG and WebP pictures) and through the
format-1 layout (written here with h5py as hpcvid 0.1 wrote it: padded token states per clip, raw pictures, one
chunk per clip), then measured by field with the same function `hpcvid inspect` uses:

  quickstart  16 frames at 64x64 (tiny Reducio: latent 16x4x8x8 float16), real frames of the quickstart videos as
              content pictures, their real captions through MiniLM (384 dims, max_tokens 32)
  paper       16 frames at 256x256 (the Reducio paper's latent 16x4x8x8 float16), real frames of the four sample
              videos cropped to 256x256, synthetic T5-XXL-size token states (4096 dims, max_tokens 120) with the
              token counts MiniLM's WordPiece gives the captions (T5's are within a few tokens)

Beside them: per-frame SD-style float16 latents, 4 x H/8 x W/8 for every frame (16 x 4 x 32 x 32 at 256x256), the
layout of pipelines that encode frame by frame. Latents are random normal (float16 barely compresses either way).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.quickstart_data import build as build_quickstart  # noqa: E402
from hpcvid.data.shard_file import STR, ClipRecord, ShardWriter, field_bytes  # noqa: E402
from hpcvid.data.video import read_clips  # noqa: E402

FRAMES = 16
SETTINGS = {   # name: (size, latent shape, text dim, max tokens)
    "quickstart": (64, (16, 4, 8, 8), 384, 32),
    "paper": (256, (16, 4, 8, 8), 4096, 120),
}


def collect(videos: Path, size: int, clips_per_caption: int, real_only: bool) -> list[tuple[np.ndarray, str]]:
    """(content picture uint8 (3, size, size), caption) per clip. Quickstart: 2 clips of every quickstart video.
    real_only: 6 clips of each real sample video (camera and film frames compress like a dataset's, the synthetic
    shapes far better). Each run of clips_per_caption clips of a video shares one caption (a video's clips do)."""
    out = []
    samples = ("bigbuckbunny", "bikes", "carphone_pristine", "carphone_distorted")
    for path in sorted(videos.glob("*.mp4")):
        if real_only and path.stem not in samples:
            continue
        caption = path.with_suffix(".txt").read_text().strip()
        try:
            _, clips = read_clips(path, FRAMES, None, 6 if real_only else 2, [(size, size)])
        except Exception:      # noqa: BLE001 - too short at this setting: left out
            continue
        out += [(np.ascontiguousarray(c.frames[(FRAMES - 1) // 2].transpose(2, 0, 1)),
                 f"{caption}, part {j // clips_per_caption}") for j, c in enumerate(clips)]
    return out


def token_states(captions: list[str], dim: int, max_tokens: int, real: bool) -> dict[str, np.ndarray]:
    """Unpadded per-token states per distinct caption: MiniLM's own (real) or random of the same token counts."""
    from hpcvid.config import TextSpec
    from hpcvid.stages.encoders import load_text_encoder

    encoder = load_text_encoder(TextSpec(encoder="minilm", max_tokens=max_tokens))
    distinct = list(dict.fromkeys(captions))
    states, mask = encoder(distinct)
    rng = np.random.default_rng(0)
    out = {}
    for caption, s, m in zip(distinct, states.numpy(), mask.numpy()):
        out[caption] = s[m].astype(np.float16) if real else \
            rng.standard_normal((int(m.sum()), dim)).astype(np.float16)
    return out


def write_format_2(path: Path, items, latent_shape, states, codec: str) -> dict[str, int]:
    writer = ShardWriter(path, {"benchmark": "shard_bytes"}, image_codec=codec)
    rng = np.random.default_rng(1)
    for start in range(0, len(items), 8):                       # encoder batches of 8, as prep.batch_size
        batch = items[start:start + 8]
        for _, caption in batch:
            writer.add_caption(caption, states[caption])
        records = [ClipRecord(f"v{start + i}", c, start + i, 0, 1, 8.0) for i, (_, c) in enumerate(batch)]
        latents = rng.standard_normal((len(batch), *latent_shape)).astype(np.float16)
        size = batch[0][0].shape[1:]
        writer.add(size, latents, records, [writer.caption_row(c) for _, c in batch],
                   images={"content": np.stack([p for p, _ in batch])})
    total = writer.commit()
    return {**writer.field_bytes, "total": total}


def write_format_1(path: Path, items, latent_shape, states, max_tokens: int) -> dict[str, int]:
    """The hpcvid 0.1 layout: every clip with its caption and padded states, raw pictures, one chunk per clip."""
    n, dim = len(items), next(iter(states.values())).shape[1]
    rng = np.random.default_rng(1)
    emb = np.zeros((n, max_tokens, dim), np.float16)
    mask = np.zeros((n, max_tokens), bool)
    for i, (_, caption) in enumerate(items):
        emb[i, :len(states[caption])], mask[i, :len(states[caption])] = states[caption], True
    gzip = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "hpcvid-shard", "format_version": 1, "num_clips": n})
        g = f.create_group(f"clips/{items[0][0].shape[1]}x{items[0][0].shape[2]}")
        data = {"latents": (rng.standard_normal((n, *latent_shape)).astype(np.float16), {}),
                "clip_id": (np.array([f"v{i}@0" for i in range(n)], dtype=object).astype(STR), {}),
                "video_id": (np.array([f"v{i}" for i in range(n)], dtype=object).astype(STR), {}),
                "caption": (np.array([c for _, c in items], dtype=object).astype(STR), {}),
                "row": (np.arange(n, dtype=np.int64), {}), "start_frame": (np.zeros(n, np.int64), {}),
                "stride": (np.ones(n, np.int32), {}), "fps": (np.full(n, 8.0, np.float32), {}),
                "text_emb": (emb, {}), "text_mask": (mask, {}),
                "extras/content": (np.stack([p for p, _ in items]), gzip)}
        for name, (values, filters) in data.items():
            g.create_dataset(name, data=values, chunks=(1, *values.shape[1:]), maxshape=(None, *values.shape[1:]),
                             **filters)
        sizes = field_bytes(f)
    total = path.stat().st_size
    return {**sizes, "hdf5_structure": total - sum(sizes.values()), "total": total}


def per_clip(sizes: dict[str, int], n: int) -> dict[str, float]:
    return {k: round(v / n, 1) for k, v in sizes.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips-per-caption", type=int, default=2,
                        help="clips cut from each video (they share its caption): 1 is WebVid-like at 16 frames")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "quickstart")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shard_bytes.json")
    args = parser.parse_args(argv)
    build_quickstart(args.data)
    report = {"benchmark": "shard_bytes", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": {"platform": platform.platform(), "python": platform.python_version()},
              "clips_per_caption": args.clips_per_caption, "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (size, latent_shape, dim, max_tokens) in SETTINGS.items():
            items = collect(args.data / "videos", size, args.clips_per_caption, real_only=(name == "paper"))
            states = token_states([c for _, c in items], dim, max_tokens, real=(name == "quickstart"))
            n = len(items)
            layouts = {
                "format_1": write_format_1(Path(tmp) / f"{name}-1.h5", items, latent_shape, states, max_tokens),
                "format_2_png": write_format_2(Path(tmp) / f"{name}-2p.h5", items, latent_shape, states, "png"),
                "format_2_webp": write_format_2(Path(tmp) / f"{name}-2w.h5", items, latent_shape, states, "webp"),
            }
            per_frame = FRAMES * 4 * (size // 8) ** 2 * 2        # SD-style float16 latents of every frame
            clips = {k: per_clip(v, n) for k, v in layouts.items()}
            setting = {"clips": n, "frame_size": size, "latent_shape": list(latent_shape), "text_dim": dim,
                       "max_tokens": max_tokens, "mean_caption_tokens": round(
                           float(np.mean([len(states[c]) for _, c in items])), 1),
                       "bytes_per_clip": clips, "per_frame_sd_latents_bytes_per_clip": per_frame}
            ratios = {}
            for k, v in clips.items():      # per-frame latents alone, and with the same text and ids as ours
                ratios[k] = {"latents": round(v["latents"] / per_frame, 4),
                             "latents_and_content": round((v["latents"] + v["content"]) / per_frame, 4),
                             "total_vs_latents_only": round(v["total"] / per_frame, 4),
                             "total_vs_latents_with_same_text": round(
                                 v["total"] / (per_frame + clips["format_2_png"]["text"] + v["ids"]), 4)}
            setting["over_per_frame_latents"] = ratios
            setting["format_2_png_over_format_1"] = round(clips["format_2_png"]["total"] / clips["format_1"]["total"],
                                                          4)
            report["settings"][name] = setting
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, s in report["settings"].items():
        print(f"{name}: {s['clips']} clips of {FRAMES}x{s['frame_size']}x{s['frame_size']}, text {s['text_dim']} "
              f"dims x {s['mean_caption_tokens']} tokens (max {s['max_tokens']}), {args.clips_per_caption} clips "
              f"per caption; per-frame SD latents {s['per_frame_sd_latents_bytes_per_clip']} B per clip")
        for layout, fields in s["bytes_per_clip"].items():
            shown = ", ".join(f"{k} {v:.0f}" for k, v in sorted(fields.items(), key=lambda kv: -kv[1]) if k != "total")
            r = s["over_per_frame_latents"][layout]
            print(f"  {layout:14s} total {fields['total']:.0f} B: {shown}")
            print(f"  {'':14s} over per-frame latents: latents {r['latents']:.4f}, latents + content "
                  f"{r['latents_and_content']:.4f}, total {r['total_vs_latents_only']:.4f} (vs latents with the same "
                  f"text {r['total_vs_latents_with_same_text']:.4f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

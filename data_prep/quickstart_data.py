"""Build the quickstart data: synthetic moving-shape videos plus the real sample clips, with captions.

    python -m data_prep.quickstart_data data/quickstart

Writes DEST/videos/<name>.mp4 with <name>.txt captions (the `folder` manifest layout), and the same videos described
as a WebVid-10M CSV (DEST/webvid.csv) and an OpenVid-1M CSV (DEST/openvid.csv), so every manifest layout can be
tried on them. Idempotent: existing files are kept.
"""
from __future__ import annotations

import argparse
import csv
import io
import shutil
import sys
from pathlib import Path

from data_prep.fetch_samples import fetch_samples
from data_prep.make_synthetic import make_synthetic_videos
from hpcvid.io import atomic_write_bytes
from hpcvid.data.video import VideoReader

SAMPLE_CAPTIONS = {
    "bigbuckbunny": "a big white cartoon rabbit stands in a green meadow under a blue sky",
    "bikes": "people ride bicycles past parked cars on a city street",
    "carphone_pristine": "a man talks on a mobile phone while sitting in a moving car",
    "carphone_distorted": "a blurry low quality clip of a man talking on a phone in a car",
}
# Long enough for 16-frame clips at 8 fps (a 46-frame span at 24 fps); varied sizes, aspect ratios and rates.
SYNTHETIC = [
    {"name": f"shapes_{i:02d}", "height": h, "width": w, "fps": fps, "num_frames": n}
    for i, (h, w, fps, n) in enumerate([(64, 64, 24, 96), (72, 128, 30, 120), (128, 72, 24, 72), (96, 128, 24, 96),
                                        (64, 112, 8, 40), (96, 96, 12, 64), (72, 128, 24, 120), (64, 64, 8, 24)])
]


def build(dest: Path) -> list[Path]:
    videos = dest / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    todo = [s for s in SYNTHETIC if not (videos / f"{s['name']}.mp4").exists()]
    made = make_synthetic_videos(videos, todo, seed=0) if todo else []
    for path, caption in made:
        atomic_write_bytes(path.with_suffix(".txt"), (caption + "\n").encode())
    try:
        samples = fetch_samples()
    except Exception as e:   # noqa: BLE001 - the quickstart still works on synthetic videos alone
        print(f"quickstart_data: sample videos unavailable ({e}); using synthetic videos only", file=sys.stderr)
        samples = {}
    for name, source in samples.items():
        stem = Path(name).stem
        target = videos / f"{stem}.mp4"
        if not target.exists():
            shutil.copyfile(source, target)
            atomic_write_bytes(target.with_suffix(".txt"), (SAMPLE_CAPTIONS.get(stem, stem) + "\n").encode())
    paths = sorted(videos.glob("*.mp4"))
    _write_manifests(dest, paths)
    return paths


def _write_manifests(dest: Path, paths: list[Path]) -> None:
    """The same videos in the two public CSV layouts (video_root = DEST/videos)."""
    webvid, openvid = io.StringIO(), io.StringIO()
    w = csv.writer(webvid)
    w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
    o = csv.writer(openvid)
    o.writerow(["video", "caption", "aesthetic score", "motion score", "temporal consistency score",
                "camera motion", "frame", "fps", "seconds"])
    for path in paths:
        caption = path.with_suffix(".txt").read_text().strip()
        with VideoReader(path) as reader:
            info = reader.info
        seconds = info.num_frames / info.fps
        w.writerow([path.stem, f"https://example.invalid/{path.name}", f"PT00H00M{int(seconds):02d}S", "", caption])
        o.writerow([path.name, caption, "5.0", "4.0", "0.99", "static", info.num_frames, f"{info.fps:g}",
                    f"{seconds:.2f}"])
    atomic_write_bytes(dest / "webvid.csv", webvid.getvalue().encode())
    atomic_write_bytes(dest / "openvid.csv", openvid.getvalue().encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    paths = build(args.dest)
    print(f"quickstart data: {len(paths)} videos with captions in {args.dest / 'videos'}; "
          f"manifests {args.dest / 'webvid.csv'}, {args.dest / 'openvid.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

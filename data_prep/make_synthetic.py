"""Synthetic captioned videos of moving shapes: real mp4 files for tests and the quickstart, made in seconds.

Each video is a drifting two-colour gradient with 2-4 soft-edged circles or rectangles that move at constant
velocity and bounce off the borders. The scene is drawn from (seed, name) only, in units of the frame size and
seconds, so the caption does not depend on the size, fps or length, and the same name and seed always give the
same video whatever the order of the specs.

    python -m data_prep.make_synthetic OUT_DIR [--count N] [--seed S] [--size HxW] [--frames N] [--fps F] [--captions]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_SPECS: list[dict] = [
    {"name": "square_24fps", "height": 64, "width": 64, "fps": 24.0, "num_frames": 48},
    {"name": "landscape_30fps", "height": 72, "width": 128, "fps": 30.0, "num_frames": 60},
    {"name": "portrait_8fps", "height": 128, "width": 72, "fps": 8.0, "num_frames": 32},
    {"name": "fourthree_24fps", "height": 96, "width": 128, "fps": 24.0, "num_frames": 40},
    {"name": "short_24fps", "height": 64, "width": 96, "fps": 24.0, "num_frames": 10},  # shorter than a 16-frame clip
    {"name": "square_8fps", "height": 96, "width": 96, "fps": 8.0, "num_frames": 48},
]
SPEC_KEYS = ("name", "height", "width", "fps", "num_frames")

SHAPE_COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (240, 215, 40),
    "orange": (245, 140, 30), "purple": (150, 60, 200), "white": (245, 245, 245), "cyan": (40, 210, 220),
    "pink": (245, 120, 185),
}
BACKGROUND_COLOURS = {
    "navy": (20, 25, 80), "maroon": (85, 20, 30), "dark green": (15, 70, 35), "grey": (70, 70, 75),
    "brown": (80, 50, 25), "teal": (10, 75, 80), "black": (10, 10, 12),
}
# compass names for a velocity angle; image y points down, so "up" is negative vy
_DIRECTIONS = ["right", "down and right", "down", "down and left", "left", "up and left", "up", "up and right"]


@dataclass(frozen=True)
class Shape:
    kind: str  # "circle", "square" or "rectangle"
    colour: str
    pos: tuple[float, float]  # (y, x) centre at t=0, in units of the frame's short side
    half: tuple[float, float]  # (y, x) half extents (radius twice for a circle), same units
    vel: tuple[float, float]  # (vy, vx) short sides per second


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[str, str]
    angle: float  # gradient direction, radians
    drift: float  # gradient phase cycles per second


def _rng(name: str, seed: int) -> np.random.Generator:
    """Stable per-video generator: crc32 instead of hash(), which Python salts per process."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def make_scene(name: str, seed: int = 0) -> Scene:
    """The shapes, colours and motions of video `name`; independent of its size, fps and length."""
    rng = _rng(name, seed)
    count = int(rng.integers(2, 5))
    colours = rng.choice(list(SHAPE_COLOURS), size=count, replace=False)
    shapes = []
    for colour in colours:
        kind = str(rng.choice(["circle", "square", "rectangle"]))
        if kind == "circle":
            r = rng.uniform(0.08, 0.16)
            half = (r, r)
        elif kind == "square":
            s = rng.uniform(0.07, 0.14)
            half = (s, s)
        else:
            a, b = rng.uniform(0.05, 0.09), rng.uniform(0.12, 0.2)
            half = (a, b) if rng.random() < 0.5 else (b, a)
        speed, heading = rng.uniform(0.3, 0.8), rng.uniform(0, 2 * math.pi)
        vel = (speed * math.sin(heading), speed * math.cos(heading))
        pos = (rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8))  # scaled to the free range when drawn
        shapes.append(Shape(kind, str(colour), pos, half, vel))
    background = tuple(str(c) for c in rng.choice(list(BACKGROUND_COLOURS), size=2, replace=False))
    return Scene(tuple(shapes), background, float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.05, 0.25)))


def _direction(vel: tuple[float, float]) -> str:
    angle = math.atan2(vel[0], vel[1])  # 0 = right, pi/2 = down
    return _DIRECTIONS[round(angle / (math.pi / 4)) % 8]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(name: str, seed: int = 0) -> str:
    """A deterministic one-line caption describing video `name`'s shapes, motions and background."""
    scene = make_scene(name, seed)
    parts = [f"{_article(s.colour)} {s.colour} {s.kind} moving {_direction(s.vel)}" for s in scene.shapes]
    listed = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on a drifting {scene.background[0]} and {scene.background[1]} gradient"


def _bounce(start: np.ndarray, travel: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Position after `travel` from `start` between walls lo and hi, reflecting off them (a triangle wave)."""
    length = max(hi - lo, 1e-6)
    m = np.mod(start - lo + travel, 2 * length)
    return lo + np.where(m <= length, m, 2 * length - m)


def render_frames(scene: Scene, height: int, width: int, fps: float, num_frames: int) -> np.ndarray:
    """Draw the scene as uint8 (T, H, W, 3) RGB frames."""
    unit = min(height, width)  # pixels per scene unit
    t = np.arange(num_frames, dtype=np.float32) / fps  # (T,) seconds
    yy = np.arange(height, dtype=np.float32)[None, :, None] + 0.5  # (1, H, 1) pixel centres
    xx = np.arange(width, dtype=np.float32)[None, None, :] + 0.5  # (1, 1, W)

    # background: two colours blended by a sine along `angle`, its phase drifting with time
    c0, c1 = (np.array(BACKGROUND_COLOURS[c], np.float32) for c in scene.background)
    u = (xx * math.cos(scene.angle) + yy * math.sin(scene.angle)) / math.hypot(height, width)  # (1, H, W)
    mix = 0.5 + 0.5 * np.sin(2 * math.pi * (u + scene.drift * t[:, None, None]))  # (T, H, W)
    frames = c0 + (c1 - c0) * mix[..., None]  # (T, H, W, 3)

    for s in scene.shapes:
        hy, hx = s.half[0] * unit, s.half[1] * unit
        # centres bounce inside [half, side - half]; pos in (0,1) places them along that free range
        cy = _bounce(np.float32(hy + s.pos[0] * (height - 2 * hy)), s.vel[0] * unit * t, hy, height - hy)  # (T,)
        cx = _bounce(np.float32(hx + s.pos[1] * (width - 2 * hx)), s.vel[1] * unit * t, hx, width - hx)  # (T,)
        dy = yy - cy[:, None, None]  # (T, H, 1)
        dx = xx - cx[:, None, None]  # (T, 1, W)
        if s.kind == "circle":
            alpha = np.clip(hy + 0.5 - np.sqrt(dy * dy + dx * dx), 0, 1)  # (T, H, W) soft 1-pixel edge
        else:
            alpha = np.clip(hy + 0.5 - np.abs(dy), 0, 1) * np.clip(hx + 0.5 - np.abs(dx), 0, 1)  # (T, H, W)
        colour = np.array(SHAPE_COLOURS[s.colour], np.float32)
        frames += (colour - frames) * alpha[..., None]
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def _check_spec(spec: dict) -> dict:
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"synthetic spec {spec!r} lacks {', '.join(missing)}")
    out = {"name": str(spec["name"]), "height": int(spec["height"]), "width": int(spec["width"]),
           "fps": float(spec["fps"]), "num_frames": int(spec["num_frames"])}
    if out["height"] < 2 or out["width"] < 2 or out["height"] % 2 or out["width"] % 2:
        raise ValueError(f"synthetic spec {out['name']!r}: size {out['height']}x{out['width']} must be even, >= 2")
    if out["fps"] <= 0 or out["num_frames"] < 1:
        raise ValueError(f"synthetic spec {out['name']!r}: fps must be > 0 and num_frames >= 1")
    if not out["name"] or "/" in out["name"] or out["name"].startswith("."):
        raise ValueError(f"synthetic spec name {out['name']!r} is not a plain file name")
    return out


def make_synthetic_videos(out_dir: str | Path, specs: list[dict] | None = None,
                          seed: int = 0) -> list[tuple[Path, str]]:
    """Write `<name>.mp4` for each spec (default: DEFAULT_SPECS) and return [(path, caption), ...] in spec order.

    Captions come back alongside the paths because every consumer (manifests, tests) needs both.
    """
    from hpcvid.data.video import write_mp4

    checked = [_check_spec(s) for s in (DEFAULT_SPECS if specs is None else specs)]
    names = [s["name"] for s in checked]
    if len(set(names)) != len(names):
        raise ValueError(f"synthetic spec names must be unique, got {names}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in checked:
        scene = make_scene(spec["name"], seed)
        frames = render_frames(scene, spec["height"], spec["width"], spec["fps"], spec["num_frames"])
        path = out / f"{spec['name']}.mp4"
        write_mp4(path, frames, spec["fps"], deterministic=True)   # the same bytes on every CPU
        results.append((path, make_caption(spec["name"], seed)))
    return results


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 64x96 (HxW), got {text!r}") from None
    return h, w


def specs_from_args(count: int | None, size: tuple[int, int] | None, frames: int | None,
                    fps: float | None) -> list[dict] | None:
    """CLI specs: None (the defaults) when nothing is asked, else `count` videos named synth_000...; any setting
    not given cycles through the default specs' values, so a plain --count still varies sizes and rates."""
    if count is None and size is None and frames is None and fps is None:
        return None
    specs = []
    for i in range(len(DEFAULT_SPECS) if count is None else count):
        base = DEFAULT_SPECS[i % len(DEFAULT_SPECS)]
        h, w = size if size else (base["height"], base["width"])
        specs.append({"name": f"synth_{i:03d}", "height": h, "width": w, "fps": fps or base["fps"],
                      "num_frames": frames or base["num_frames"]})
    return specs


def _write_text(path: Path, text: str) -> None:
    """Atomic small write: a reader never sees half a caption."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.make_synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, help="number of videos (default: the built-in varied set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=_parse_size, help="HxW, both even (default: varied)")
    parser.add_argument("--frames", type=int, help="frames per video (default: varied)")
    parser.add_argument("--fps", type=float, help="frame rate (default: varied)")
    parser.add_argument("--captions", action="store_true", help="also write <name>.txt with each caption")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be >= 1")
    try:
        made = make_synthetic_videos(args.out_dir, specs_from_args(args.count, args.size, args.frames, args.fps),
                                     seed=args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, caption in made:
        if args.captions:
            _write_text(path.with_suffix(".txt"), caption + "\n")
        print(f"{path}\t{caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

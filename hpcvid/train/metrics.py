"""Image-quality metrics, the metrics log, and PNG pictures a person can look at: all without extra libraries.

PSNR and SSIM take videos in [-1, 1] (data range 2) shaped (B, C, T, H, W) (or images (B, C, H, W)) and return one
value per clip; SSIM is differentiable, so the training loss uses the same function. PNGs are written by hand
(zlib + struct) because neither matplotlib nor Pillow is a dependency; curves get a 3x5 pixel font for labels.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hpcvid.io import atomic_write_bytes, strict_json

SSIM_WINDOW = 11          # the usual Gaussian SSIM window (Wang et al. 2004): 11 taps, sigma 1.5
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


# ---------------------------------------------------------------------------------------------------- metrics

def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample in dB: 10 log10(range^2 / MSE), the MSE over all of a clip's values."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)              # (B,)
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-12))         # (B,), capped at 120 dB + range


def _gaussian(size: int, sigma: float, device, dtype) -> torch.Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()                                                        # (size,)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Structural similarity per sample: the mean SSIM map over frames, channels and valid positions.

    Gaussian-weighted local statistics (window 11, sigma 1.5; shrunk to the frame when it is smaller), computed
    per frame and channel. 1 for identical inputs; differentiable.
    """
    if x.shape != y.shape or x.ndim not in (4, 5):
        raise ValueError(f"ssim: inputs must share a (B, C, H, W) or (B, C, T, H, W) shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    x, y = x.float(), y.float()
    B, C = x.shape[:2]
    H, W = x.shape[-2:]
    if x.ndim == 5:
        x = x.transpose(1, 2).reshape(-1, C, H, W)                            # (B T, C, H, W)
        y = y.transpose(1, 2).reshape(-1, C, H, W)
    size = min(window, H, W)
    size -= 1 - size % 2                                                      # odd
    g = _gaussian(size, sigma, x.device, x.dtype)
    gy = g.view(1, 1, size, 1).expand(C, 1, size, 1)
    gx = g.view(1, 1, 1, size).expand(C, 1, 1, size)

    def blur(t: torch.Tensor) -> torch.Tensor:                                # separable, valid: (N, C, H', W')
        return F.conv2d(F.conv2d(t, gy, groups=C), gx, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return smap.reshape(B, -1).mean(dim=1)                                    # (B,)


def temporal_error(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """How differently two videos (B, C, T, H, W) change from frame to frame: the mean absolute difference of
    their frame-to-frame changes, in grey levels (0..255), per sample. 0 when x moves exactly as y does; for a still
    x (a repeated frame) it is y's own mean change. Needs no learned weights, unlike flow-warping metrics."""
    if x.shape != y.shape or x.ndim != 5 or x.shape[2] < 2:
        raise ValueError(f"temporal_error: inputs must share a (B, C, T>=2, H, W) shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    dx, dy = x.float().diff(dim=2), y.float().diff(dim=2)                    # (B, C, T-1, H, W)
    return (dx - dy).abs().flatten(1).mean(dim=1) * 255.0 / data_range       # (B,)


def frame_changes(video: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean absolute change between consecutive frames of (B, C, T, H, W), in grey levels: (B, T-1). The seams
    of a rendered video show as transitions much larger than their neighbours."""
    return video.float().diff(dim=2).abs().mean(dim=(1, 3, 4)) * 255.0 / data_range   # (B, T-1)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 0..255, as a video would be stored."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]."""
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------- JSONL log

def strict_record(record: dict[str, Any]) -> dict[str, Any]:
    """`record` as strict JSON can hold it: NaN and +-inf become null (at any depth), and the top-level keys that
    held them are listed under "nonfinite", so that a diverging run's log still reads with jq or a strict parser."""
    def nonfinite(value: Any) -> bool:
        if isinstance(value, float):
            return not math.isfinite(value)
        if isinstance(value, dict):
            return any(nonfinite(v) for v in value.values())
        return isinstance(value, (list, tuple)) and any(nonfinite(v) for v in value)

    out = {k: strict_json(v) for k, v in record.items() if k != "nonfinite"}
    bad = sorted({*record.get("nonfinite", ()), *(k for k, v in record.items() if k != "nonfinite" and nonfinite(v))})
    if bad:
        out["nonfinite"] = bad
    return out


def _line(record: dict[str, Any]) -> str:
    return json.dumps(strict_record(record), allow_nan=False) + "\n"


class MetricsLog:
    """One strict JSON object a line (NaN/inf written as null, see strict_record). On resume from step s, lines after
    s (work that is redone) are dropped first."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(_line(r) for r in kept).encode())
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(_line(record))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete line; a torn last line (a crash mid-write) is skipped. Bare NaN/Infinity (logs written before
    strict_record) are still read, as float NaN/inf."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# ---------------------------------------------------------------------------------------------------- PNG

def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB or (H, W) grey -> a PNG file's bytes (filter 0, zlib level 6)."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"png: need uint8 (H, W, 3) or (H, W), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    rows = image.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()   # filter byte 0 before each row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2 if image.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_png(path: Path, image: np.ndarray) -> None:
    atomic_write_bytes(Path(path), png_bytes(image))


def read_png_size(path: Path) -> tuple[int, int]:
    """(height, width) from a PNG's header (for tests and checks)."""
    data = Path(path).read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError(f"{path}: not a PNG file")
    w, h = struct.unpack(">II", data[16:24])
    return h, w


BACKGROUND = 24          # dark grey between frames and clips


def contact_sheet(pairs: Sequence[tuple[np.ndarray, np.ndarray]], frames: int = 8, gap: int = 2,
                  min_frame: int = 96) -> np.ndarray:
    """For each clip, a row of its original frames over the same frames reconstructed: uint8 (H, W, 3).

    pairs: [(original, reconstruction)], each uint8 (T, H, W, 3). `frames` frames evenly spaced over the clip;
    small frames are enlarged (nearest neighbour) to at least `min_frame` pixels high so they can be seen.
    """
    if not pairs:
        raise ValueError("contact_sheet: no clips")
    blocks = []
    for original, recon in pairs:
        T, H, W, _ = original.shape
        idx = np.unique(np.linspace(0, T - 1, min(frames, T)).round().astype(int))
        k = max(1, -(-min_frame // H))
        block = np.full((2 * H * k + gap, len(idx) * (W * k + gap) - gap, 3), BACKGROUND, np.uint8)
        for r, video in enumerate((original, recon)):
            for j, i in enumerate(idx):
                tile = np.kron(video[i], np.ones((k, k, 1), np.uint8))           # (H k, W k, 3)
                y, x = r * (H * k + gap), j * (W * k + gap)
                block[y:y + H * k, x:x + W * k] = tile
        blocks.append(block)
    pad = 4 * gap
    width = max(b.shape[1] for b in blocks) + 2 * pad
    height = sum(b.shape[0] + pad for b in blocks) + pad
    sheet = np.full((height, width, 3), BACKGROUND, np.uint8)
    y = pad
    for b in blocks:
        sheet[y:y + b.shape[0], pad:pad + b.shape[1]] = b
        y += b.shape[0] + pad
    return sheet


# ---------------------------------------------------------------------------------------------------- curves

# A 3x5 pixel font (rows top to bottom, '#' lit) for axis labels: digits, capitals and a little punctuation.
_GLYPHS = dict(zip(
    "0123456789.-ABCDEFGHIJKLMNOPQRSTUVWXYZ()/:=, ",
    """### #.# #.# #.# ###|.#. ##. .#. .#. ###|### ..# ### #.. ###|### ..# ### ..# ###|#.# #.# ### ..# ..#|
    ### #.. ### ..# ###|### #.. ### #.# ###|### ..# ..# ..# ..#|### #.# ### #.# ###|### #.# ### ..# ###|
    ... ... ... ... .#.|... ... ### ... ...|.#. #.# ### #.# #.#|##. #.# ##. #.# ##.|.## #.. #.. #.. .##|
    ##. #.# #.# #.# ##.|### #.. ##. #.. ###|### #.. ##. #.. #..|.## #.. #.# #.# .##|#.# #.# ### #.# #.#|
    ### .#. .#. .#. ###|..# ..# ..# #.# .#.|#.# #.# ##. #.# #.#|#.. #.. #.. #.. ###|#.# ### ### #.# #.#|
    ##. #.# #.# #.# #.#|.#. #.# #.# #.# .#.|##. #.# ##. #.. #..|.#. #.# #.# ##. .##|##. #.# ##. #.# #.#|
    .## #.. .#. ..# ##.|### .#. .#. .#. .#.|#.# #.# #.# #.# ###|#.# #.# #.# #.# .#.|#.# #.# ### ### #.#|
    #.# #.# .#. #.# #.#|#.# #.# .#. .#. .#.|### ..# .#. #.. ###|.#. #.. #.. #.. .#.|.#. ..# ..# ..# .#.|
    ..# ..# .#. #.. #..|... .#. ... .#. ...|... ### ... ### ...|... ... ... .#. #..|... ... ... ... ...""".replace(
        "\n", "").replace("    ", "").split("|")))


def draw_text(canvas: np.ndarray, text: str, y: int, x: int, colour=(230, 230, 230), scale: int = 2) -> None:
    """Write `text` (upper-cased; unknown characters become spaces) with its top-left corner at (y, x)."""
    for i, ch in enumerate(text.upper()):
        rows = _GLYPHS.get(ch, _GLYPHS[" "]).split()
        for r, row in enumerate(rows):
            for c, cell in enumerate(row):
                if cell == "#":
                    y0, x0 = y + r * scale, x + (i * 4 + c) * scale
                    canvas[max(y0, 0):max(y0 + scale, 0), max(x0, 0):max(x0 + scale, 0)] = colour


def _fmt(v: float) -> str:
    if v == 0 or 0.01 <= abs(v) < 10000:
        return f"{v:.3g}"
    return f"{v:.1e}"


def _panel(xs: np.ndarray, series: list[tuple[np.ndarray, tuple[int, int, int]]], title: str, log: bool,
           size: tuple[int, int] = (300, 480)) -> np.ndarray:
    H, W = size
    left, right, top, bottom = 70, 14, 30, 30
    canvas = np.full((H, W, 3), 250, np.uint8)
    draw_text(canvas, title, 8, left, (20, 20, 20))
    ph, pw = H - top - bottom, W - left - right
    canvas[top:top + ph + 1, left] = canvas[top + ph, left:left + pw + 1] = (60, 60, 60)
    values = np.concatenate([v for v, _ in series]) if series else np.zeros(1)
    values = values[np.isfinite(values)]
    if log:
        values = values[values > 0]
    if values.size == 0 or xs.size == 0:
        return canvas
    lo, hi = float(values.min()), float(values.max())
    f = (lambda v: np.log10(np.maximum(v, 1e-30))) if log else (lambda v: v)
    flo, fhi = f(lo), f(hi)
    if fhi - flo < 1e-12:
        flo, fhi = flo - 0.5, fhi + 0.5
    x0, x1 = float(xs.min()), float(xs.max()) if xs.max() > xs.min() else float(xs.min()) + 1
    for values_, colour in series:
        px = left + (xs - x0) / (x1 - x0) * pw
        py = top + ph - (f(values_) - flo) / (fhi - flo) * ph
        ok = np.isfinite(py)
        px, py = px[ok], py[ok]
        for a in range(len(px) - 1):        # straight segments, sampled densely enough to be continuous
            n = int(max(abs(px[a + 1] - px[a]), abs(py[a + 1] - py[a]))) + 2
            for t in np.linspace(0, 1, n):
                yy = int(round(py[a] + t * (py[a + 1] - py[a])))
                xx = int(round(px[a] + t * (px[a + 1] - px[a])))
                canvas[max(yy - 1, 0):yy + 1, max(xx - 1, 0):xx + 1] = colour
        if len(px) == 1:
            canvas[int(py[0]) - 2:int(py[0]) + 2, int(px[0]) - 2:int(px[0]) + 2] = colour
    draw_text(canvas, _fmt(hi), top - 4, 4, (20, 20, 20))
    draw_text(canvas, _fmt(lo), top + ph - 6, 4, (20, 20, 20))
    draw_text(canvas, _fmt(x0), top + ph + 8, left, (20, 20, 20))
    end = _fmt(x1)
    draw_text(canvas, end, top + ph + 8, left + pw - 8 * len(end), (20, 20, 20))
    draw_text(canvas, "STEP", top + ph + 8, left + pw // 2 - 16, (90, 90, 90))
    return canvas


def curves_png(records: Iterable[dict[str, Any]], path: Path) -> None:
    """Training curves from metrics records: total loss (log scale, with L1) and batch PSNR, side by side."""
    records = [r for r in records if "step" in r and "loss" in r]
    xs = np.array([r["step"] for r in records], dtype=float)
    loss = np.array([r["loss"] for r in records], dtype=float)
    l1 = np.array([r.get("l1", math.nan) for r in records], dtype=float)
    ps = np.array([r.get("psnr", math.nan) for r in records], dtype=float)
    left = _panel(xs, [(loss, (200, 60, 40)), (l1, (40, 90, 200))], "LOSS (RED) L1 (BLUE) LOG", log=True)
    right = _panel(xs, [(ps, (30, 140, 60))], "BATCH PSNR DB", log=False)
    write_png(path, np.concatenate([left, right], axis=1))

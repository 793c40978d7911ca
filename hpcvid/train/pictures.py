"""Pictures a person looks at: PNG files (Pillow), contact sheets of clips, training curves (matplotlib).

Pillow and matplotlib are imported inside the functions that use them, as hpcvid.data.shard_file does for Pillow:
matplotlib alone costs about 0.7 s to import, which a stage that never plots (and every rank but 0) should not pay.
Plots use matplotlib's object API on the Agg canvas, never pyplot: no display is needed (cluster nodes have none)
and no global backend or figure state is touched.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import numpy as np

from hpcvid.io import atomic_write_with

BACKGROUND = 24                  # dark grey between frames and clips
PANEL_INCHES = (6.4, 4.0)        # one plot panel; at PLOT_DPI a 640 x 400 pixel PNG
PLOT_DPI = 100
MARKERS_BELOW = 50               # draw point markers on curves with fewer points (a lone point is otherwise invisible)
LOSS_TERMS = ("loss", "l1", "mse", "kl")   # curves_png's log-scale panel: the total and its reconstruction terms


# ---------------------------------------------------------------------------------------------------- PNG

def write_png(path: Path, image: np.ndarray) -> None:
    """uint8 (H, W, 3) RGB or (H, W) grey -> a PNG file, written atomically (a reader never sees half of one)."""
    from PIL import Image

    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        # Pillow would take a float array as a 32-bit image and fail only when saving it as PNG
        raise ValueError(f"write_png {path}: need uint8 (H, W, 3) or (H, W), got {image.dtype} {image.shape}")
    picture = Image.fromarray(image)
    atomic_write_with(Path(path), lambda tmp: picture.save(tmp, format="PNG"))


def contact_sheet(pairs: Sequence[tuple[np.ndarray, np.ndarray]], frames: int = 8, gap: int = 2,
                  min_frame: int = 96) -> np.ndarray:
    """For each clip, a row of its original frames over the same frames reconstructed: uint8 (H, W, 3).

    pairs: [(original, reconstruction)], each uint8 (T, H, W, 3). `frames` frames evenly spaced over the clip;
    small frames are enlarged by a whole factor (nearest neighbour, so pixels stay sharp) to at least `min_frame`
    pixels high so they can be seen.
    """
    from PIL import Image

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
                tile = Image.fromarray(np.ascontiguousarray(video[i])).resize((W * k, H * k), Image.Resampling.NEAREST)
                y, x = r * (H * k + gap), j * (W * k + gap)
                block[y:y + H * k, x:x + W * k] = np.asarray(tile)              # (H k, W k, 3)
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

def _number(value: Any) -> float:
    """A record's value as a float; null (a non-finite value in a strict log), text or a missing key is NaN, which
    matplotlib draws as a gap in the line."""
    return float(value) if isinstance(value, (int, float)) else math.nan


class Panel(NamedTuple):
    """One plot of a figure: a line per key (keys no record holds are left out). log: None puts the values on a log
    axis when every finite one is positive (losses spanning decades stay readable), True/False forces it."""
    title: str
    keys: Sequence[str]
    log: Optional[bool] = None


def _draw(ax, records: list[dict[str, Any]], panel: Panel) -> None:
    """One panel, with a red line at each logged step whose interval had skipped (non-finite) steps."""
    steps = np.array([r["step"] for r in records], dtype=float)
    drawn = []
    for key in panel.keys:
        if not any(key in r for r in records):
            continue
        values = np.array([_number(r.get(key)) for r in records])
        ax.plot(steps, values, label=key, linewidth=1.5,
                marker="." if np.isfinite(values).sum() < MARKERS_BELOW else None)
        drawn.append(values[np.isfinite(values)])
    finite = np.concatenate(drawn) if drawn else np.zeros(0)
    if panel.log or (panel.log is None and finite.size and (finite > 0).all()):
        ax.set_yscale("log")
    if not finite.size:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes, color="grey")
    bad = [s for s, r in zip(steps, records) if r.get("skipped") or r.get("nonfinite")]
    for i, s in enumerate(bad):
        ax.axvline(s, color="red", alpha=0.35, linewidth=1.5, label="skipped (non-finite) steps" if i == 0 else None)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.grid(True, which="both", alpha=0.3)
    if drawn or bad:
        ax.legend(fontsize="small")


def plot_panels(records: Iterable[dict[str, Any]], panels: Sequence[Panel], path: Path) -> None:
    """A PNG of side-by-side Panels (or (title, keys) tuples) of metrics records (dicts with "step"; others are left
    out), skipped steps marked. Each panel is PANEL_INCHES at PLOT_DPI (640 x 400 pixels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [r for r in records if isinstance(r.get("step"), (int, float))]
    if not panels:
        raise ValueError(f"plot_panels {path}: no panels to draw")
    fig = Figure(figsize=(PANEL_INCHES[0] * len(panels), PANEL_INCHES[1]), dpi=PLOT_DPI)
    FigureCanvasAgg(fig)                     # Agg, explicitly: renders without a display
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _draw(ax, records, Panel(*panel))
    fig.tight_layout()
    atomic_write_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=PLOT_DPI))


def plot_curves(records: Iterable[dict[str, Any]], keys: Sequence[str], path: Path, title: str = "",
                log: Optional[bool] = None) -> None:
    """Training curves from metrics records (dicts with "step") in one panel: one line per key, log scale when all
    values are positive, skipped steps marked. Any trainer's keys: e.g. a loss per pyramid stage, grad norm, lr."""
    plot_panels(records, [Panel(title, keys, log)], path)


def curves_png(records: Iterable[dict[str, Any]], path: Path) -> None:
    """train_ae's curves: the total loss and its terms (log scale), and batch PSNR beside it when logged."""
    records = list(records)
    panels = [Panel("loss and its terms", LOSS_TERMS)]      # log axis unless a GAN term made the total negative
    if any("psnr" in r for r in records):
        panels.append(Panel("batch PSNR (dB)", ("psnr",), log=False))
    plot_panels(records, panels, path)

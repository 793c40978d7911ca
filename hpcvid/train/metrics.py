"""Image-quality metrics and the training log (strict JSONL, and TensorBoard event files beside it).

PSNR and SSIM take videos in [-1, 1] (data range 2) shaped (B, C, T, H, W) (or images (B, C, H, W)) and return one
value per clip; SSIM is differentiable, so the training loss uses the same function. Pictures (PNGs, contact sheets,
plotted curves) are in hpcvid.train.pictures.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Optional

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


# ---------------------------------------------------------------------------------------------------- TensorBoard

TENSORBOARD = "tensorboard"          # the event files' folder inside a run's OUTPUT
EVENT_FILES = "events.out.tfevents.*"


def record_scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every finite number in a record but "step"; nested dicts become "outer/inner" tags (which
    TensorBoard groups by the part before the slash). Nulls, text and lists are left out."""
    for key, value in record.items():
        if key == "step" and not prefix:
            continue
        if isinstance(value, dict):
            yield from record_scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and math.isfinite(value):
            yield f"{prefix}{key}", float(value)


class TrainingLog:
    """A trainer's scalar records, each written to OUTPUT/metrics.jsonl (strict, see MetricsLog) and to TensorBoard
    event files in OUTPUT/tensorboard/ (`tensorboard --logdir OUTPUT/tensorboard`), flushed at every record so that
    a killed job loses nothing it logged. Every record needs an integer "step".

    resume_step s: JSONL lines after s are dropped, and TensorBoard is told to hide the old events after s
    (purge_step s + 1: the record at s belongs to the checkpoint resumed from), so redone steps are never drawn
    twice. None: a fresh run, which removes an earlier run's JSONL and event files. enabled=False (every rank but 0)
    makes it write nothing and skips importing TensorBoard. Close it (or use `with`) so the event writer's thread
    ends with the file complete.
    """

    def __init__(self, folder: Path, resume_step: Optional[int] = None, enabled: bool = True):
        self.folder, self.enabled = Path(folder), enabled
        self.path, self.tensorboard = self.folder / "metrics.jsonl", self.folder / TENSORBOARD
        self._jsonl = self._writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter   # ~0.2 s of imports (tensorboard, protobuf)

        self._jsonl = MetricsLog(self.path, resume_step)
        if resume_step is None:
            for old in self.tensorboard.glob(EVENT_FILES):
                old.unlink()
        self._writer = SummaryWriter(str(self.tensorboard),
                                     purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = record.get("step")
        if not isinstance(step, int):
            raise ValueError(f"TrainingLog.write: every record needs an integer 'step', got {step!r} in {record}")
        if self._writer is None:
            raise RuntimeError(f"TrainingLog.write: the log of {self.folder} is closed")
        self._jsonl.write(record)
        for tag, value in record_scalars(record):
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TrainingLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the scalars in a folder of event files, as `tensorboard --logdir` shows them
    (events hidden by a resume's purge_step left out). For tests and checks."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})     # 0: keep every point, not a sample
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

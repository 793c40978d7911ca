"""Training checkpoints: one folder per step, readable without pickle, complete only once meta.json exists.

    OUTPUT/checkpoints/step-000500/
        model.safetensors          full (unsharded) weights, whatever the parallelism (safetensors: no code runs)
        optimizer.pt               optimizer state: tensors, numbers, strings, lists and dicts only, loaded back
                                   with torch.load(weights_only=True)
        discriminator.safetensors  (+ disc_optimizer.pt) when the GAN loss is on
        meta.json                  step, model kind/config, spec, files and their sizes: written LAST

"Latest valid" is the newest step folder whose meta.json exists and whose files have the sizes it records, so a
crash while saving leaves the previous checkpoint in charge. Every file is written under a temporary name, fsynced
and renamed. RNG state is not stored: every random draw of step s on rank r comes from a generator seeded by
(seed, s, r), so a resumed run draws exactly what the uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Optional

import torch

from hpcvid.config import UserError
from hpcvid.data.shards import atomic_write_bytes, atomic_write_json, read_json

CHECKPOINTS = "checkpoints"
META = "meta.json"
FORMAT = "hpcvid-checkpoint"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(output: str | Path, step: int) -> Path:
    return Path(output) / CHECKPOINTS / f"step-{step:06d}"


# ---------------------------------------------------------------------------------------------------- finding

def read_meta(folder: Path) -> Optional[dict[str, Any]]:
    """The folder's meta.json when the checkpoint is complete and intact (every file at its recorded size)."""
    meta = read_json(Path(folder) / META)
    if not meta or meta.get("format") != FORMAT:
        return None
    for name, size in meta.get("files", {}).items():
        try:
            if (Path(folder) / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return meta


def list_checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under OUTPUT/checkpoints, oldest first."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and read_meta(p) is not None:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output: str | Path) -> Optional[Path]:
    found = list_checkpoints(output)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder as given, or the latest complete checkpoint of a training output folder (UserError if none)."""
    path = Path(path)
    if (path / META).exists():
        if read_meta(path) is None:
            raise UserError(f"{path}: incomplete or damaged checkpoint (a file differs from meta.json); use another "
                            f"step folder or the training output folder")
        return path
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint or training output folder")
    latest = latest_checkpoint(path)
    if latest is None:
        raise UserError(f"{path}: no complete checkpoint (expected {path / CHECKPOINTS}/step-NNNNNN/{META}); "
                        f"train first (hpcvid train-ae) or give a step folder")
    return latest


# ---------------------------------------------------------------------------------------------------- writing

def _atomic_save(path: Path, write) -> int:
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path.stat().st_size


def save_checkpoint(folder: Path, weights: dict[str, dict[str, torch.Tensor]], states: dict[str, Any],
                    meta: dict[str, Any]) -> Path:
    """Write `weights` (name -> state dict) as NAME.safetensors and `states` (name -> plain data with tensors) as
    NAME.pt, then meta.json, which makes the checkpoint count. Call on one rank only."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):          # an older meta.json here (a redone step) stops counting first
        (folder / META).unlink()
    files = {}
    for name, state in weights.items():
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        files[f"{name}.safetensors"] = _atomic_save(folder / f"{name}.safetensors",
                                                    lambda p, t=tensors: save_file(t, str(p), {"format": FORMAT}))
    for name, state in states.items():
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(folder / f"{name}.pt", buf.getvalue())
        files[f"{name}.pt"] = (folder / f"{name}.pt").stat().st_size
    atomic_write_json(folder / META, {"format": FORMAT, "format_version": FORMAT_VERSION, "saved": time.time(),
                                      **meta, "files": files})
    return folder


def prune_checkpoints(output: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and incomplete step folders older than the
    newest complete one (a crash's leftovers). Returns the removed folders."""
    complete = list_checkpoints(output)
    removed = [p for _, p in complete[:-keep_last]] if keep_last > 0 else []
    newest = complete[-1][0] if complete else -1
    root = Path(output) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_DIR.match(p.name)
            if m and int(m.group(1)) < newest and read_meta(p) is None:
                removed.append(p)
    for p in removed:
        with contextlib.suppress(OSError):
            (p / META).unlink()                 # stops counting before its files go
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ---------------------------------------------------------------------------------------------------- reading

def load_weights(folder: Path, name: str = "model", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / f"{name}.safetensors"
    try:
        return load_file(str(path), device=str(device))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: cannot read the weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None


def load_state(folder: Path, name: str) -> Any:
    """A NAME.pt file, refusing anything but tensors and plain data (weights_only=True: no code is run)."""
    path = Path(folder) / f"{name}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln] or ["not plain data"]
        raise UserError(f"{path}: cannot load: it holds more than tensors and plain data, refused under "
                        f"weights_only ({lines[0].strip()[:160]})") from None
    except (OSError, RuntimeError) as e:
        raise UserError(f"{path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict) with the mismatch stated as a user error (wrong config, wrong checkpoint)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} in the model)")
        raise UserError(f"{source}: weights do not fit the model: {'; '.join(parts)}")
    module.load_state_dict(state)


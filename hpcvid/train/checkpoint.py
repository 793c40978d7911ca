"""Training checkpoints: one folder per step, readable without pickle, complete only once meta.json exists.

    OUTPUT/checkpoints/step-000500/
        model.safetensors          full (unsharded) weights, whatever the parallelism (safetensors: no code runs)
        optimizer.pt               optimizer state: tensors, numbers, strings, lists and dicts only, loaded back
                                   with torch.load(weights_only=True)
        discriminator.safetensors  (+ disc_optimizer.pt) when the GAN loss is on
        meta.json                  step, model kind/config, spec, files with their sizes and sha256: written LAST

A checkpoint is "complete" when its meta.json exists and every file has the size it records (cheap: what `hpcvid
status` reads). It is "verified" when, in addition, every file's content matches the sha256 recorded in meta.json:
a file damaged in place without changing its size (a bad disk, a stray write) fails here. Training resumes from,
evaluation loads, and pruning counts only verified checkpoints; a damaged one is skipped with a reason that names
the file. Format version 1 (before hashes) has sizes only and is verified by size alone. Each file is hashed once
while it is written and at most once per process when read (a cache keyed by path, size and mtime), and only the
candidates about to be trusted are hashed, newest first.

Every file is written under a temporary name, fsynced and renamed, so a crash while saving leaves the previous
checkpoint in charge. RNG state is not stored: every random draw of step s on rank r comes from a generator seeded
by (seed, s, r), so a resumed run draws exactly what the uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from hpcvid.config import UserError
from hpcvid.io import atomic_write_json, atomic_write_with, read_json

CHECKPOINTS = "checkpoints"
META = "meta.json"
FORMAT = "hpcvid-checkpoint"
FORMAT_VERSION = 2                  # 2: meta.json records each file's sha256 (1: sizes only)
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(output: str | Path, step: int) -> Path:
    return Path(output) / CHECKPOINTS / f"step-{step:06d}"


# ---------------------------------------------------------------------------------------------------- hashing

_HASHED: dict[tuple[str, int, int], str] = {}      # (absolute path, size, mtime_ns) -> sha256 hex digest


def _cache_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, hashed at most once per process while its size and mtime stay the same (big checkpoints
    take seconds to hash, and pruning and resuming look at the same files)."""
    path = Path(path)
    key = _cache_key(path)
    if key not in _HASHED:
        _HASHED[key] = _hash_file(path)
    return _HASHED[key]


def nonfinite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in `state` (a tensor or nested dicts/lists of them) holding NaN or inf."""
    if torch.is_tensor(state):
        bad = state.is_floating_point() and not bool(torch.isfinite(state).all())
        return [prefix or "tensor"] if bad else []
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    out = []
    for key, value in items:
        out += nonfinite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return out


# ---------------------------------------------------------------------------------------------------- finding

def read_meta(folder: Path) -> Optional[dict[str, Any]]:
    """The folder's meta.json when the checkpoint is complete (every file at its recorded size). Cheap: contents are
    not hashed; use check_checkpoint before trusting the files."""
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


def check_checkpoint(folder: str | Path) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(meta, None) when the checkpoint is verified: meta.json readable, every file at its recorded size and, when
    meta.json records hashes (format 2), with its recorded sha256. Otherwise (None, the reason, naming the file)."""
    folder = Path(folder)
    meta = read_json(folder / META)
    if not meta or meta.get("format") != FORMAT:
        return None, f"{folder / META}: missing, unreadable or not an hpcvid checkpoint"
    files, hashes = meta.get("files", {}), meta.get("sha256")
    if hashes is not None and set(hashes) != set(files):
        return None, f"{folder / META}: its sha256 list does not cover the same files as its sizes (edited?)"
    for name, size in files.items():
        path = folder / name
        try:
            actual = path.stat().st_size
            if actual != size:
                return None, f"{path}: {actual} bytes where meta.json records {size} (truncated or replaced)"
            if hashes is not None and file_sha256(path) != hashes[name]:
                return None, f"{path}: content differs from the sha256 in meta.json (damaged after it was written)"
        except OSError as e:
            return None, f"{path}: cannot be read ({e.strerror or type(e).__name__})"
    return meta, None


def has_hashes(meta: dict[str, Any]) -> bool:
    """False for checkpoints of format 1 (written before hashes were recorded): verified by size only."""
    return "sha256" in meta


def step_folders(output: str | Path) -> list[tuple[int, Path]]:
    """Every step-* folder under OUTPUT/checkpoints, complete or not, oldest first."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (sizes only, not hashed) under OUTPUT/checkpoints, oldest first."""
    return [(step, p) for step, p in step_folders(output) if read_meta(p) is not None]


def latest_checkpoint(output: str | Path) -> Optional[Path]:
    """The newest complete checkpoint by sizes alone (cheap, for status displays); resume with latest_valid."""
    found = list_checkpoints(output)
    return found[-1][1] if found else None


def training_progress(output: str | Path, steps: int) -> str:
    """A training run's progress for `hpcvid status`: the latest complete checkpoint's step out of `steps`."""
    latest = latest_checkpoint(output)
    if latest is None:
        return "not started" if not (Path(output) / "metrics.jsonl").exists() else "no checkpoint yet"
    step = read_meta(latest)["step"]
    return f"step {step}/{steps}" + (" (done)" if step >= steps else "")


def verified_checkpoints(output: str | Path, warn: Optional[Callable[[str], None]] = None,
                         before: Optional[int] = None) -> Iterator[tuple[int, Path, dict[str, Any]]]:
    """(step, folder, meta) of the verified checkpoints (steps below `before` when given), newest first. Hashing is
    lazy: stop iterating and older checkpoints are not read. A folder with a meta.json that fails verification is
    reported to `warn` in one line naming the file; folders without meta.json (being written, or a crash's
    leftovers) are passed over in silence, as they always were."""
    for step, folder in reversed(step_folders(output)):
        if (before is not None and step >= before) or not (folder / META).exists():
            continue
        meta, problem = check_checkpoint(folder)
        if problem is None:
            yield step, folder, meta
        elif warn is not None:
            warn(f"checkpoint {folder} skipped: {problem}")


def latest_valid_checkpoint(output: str | Path, warn: Optional[Callable[[str], None]] = None,
                            before: Optional[int] = None) -> Optional[Path]:
    """The newest verified checkpoint (below step `before`), warning about each newer damaged one; None if none."""
    for _, folder, _ in verified_checkpoints(output, warn, before):
        return folder
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder as given, or the newest checkpoint of a training output folder; verified (sizes and hashes).

    A damaged newest checkpoint is a UserError naming the file, not a silent fall-back: evaluation and prep record
    which weights they used, and using older ones must be asked for (by giving that step folder)."""
    path = Path(path)
    if (path / META).exists():
        _, problem = check_checkpoint(path)
        if problem is not None:
            raise UserError(f"{problem}: incomplete or damaged checkpoint; use another step folder or the training "
                            f"output folder")
        return path
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint or training output folder")
    candidates = [p for _, p in step_folders(path) if (p / META).exists()]
    if not candidates:
        raise UserError(f"{path}: no complete checkpoint (expected {path / CHECKPOINTS}/step-NNNNNN/{META}); "
                        f"train first (hpcvid train-ae) or give a step folder")
    _, problem = check_checkpoint(candidates[-1])
    if problem is not None:
        older = f" (e.g. {candidates[-2]})" if len(candidates) > 1 else ""
        raise UserError(f"{problem}: the newest checkpoint is damaged; give an older step folder{older}, or rerun "
                        f"train-ae, which resumes from the newest good one and rewrites it")
    return candidates[-1]


# ---------------------------------------------------------------------------------------------------- writing

def save_hashed(path: Path, write: Callable[[Path], Any]) -> tuple[int, str]:
    """Write through `write(tmp)`, hash what landed on disk, fsync, rename: (size, sha256)."""
    hashed = []
    # read back while it is in the page cache: the one hash it gets
    size = atomic_write_with(path, write, before_commit=lambda tmp: hashed.append(_hash_file(tmp)))
    _HASHED[_cache_key(path)] = hashed[0]        # verifying our own new checkpoint costs nothing in this process
    return size, hashed[0]


def save_checkpoint(folder: Path, weights: dict[str, dict[str, torch.Tensor]], states: dict[str, Any],
                    meta: dict[str, Any]) -> Path:
    """Write `weights` (name -> state dict) as NAME.safetensors and `states` (name -> plain data with tensors) as
    NAME.pt, then meta.json with each file's size and sha256, which makes the checkpoint count. Call on one rank.

    Refuses (RunStopped) any NaN or inf among the weights and states: a non-finite checkpoint would become the newest
    and push the good ones out."""
    from safetensors.torch import save_file

    from hpcvid.config import RunStopped

    folder = Path(folder)
    for name, state in {**weights, **states}.items():
        bad = nonfinite_tensors(state)
        if bad:
            raise RunStopped(f"{folder}: not saved: {len(bad)} tensor(s) of {name} hold NaN or inf (e.g. {bad[0]})")
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):          # an older meta.json here (a redone step) stops counting first
        (folder / META).unlink()
    files, hashes = {}, {}
    for name, state in weights.items():
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        file = f"{name}.safetensors"
        files[file], hashes[file] = save_hashed(folder / file,
                                                 lambda p, t=tensors: save_file(t, str(p), {"format": FORMAT}))
    for name, state in states.items():
        buf = io.BytesIO()
        torch.save(state, buf)
        file = f"{name}.pt"
        files[file], hashes[file] = save_hashed(folder / file, lambda p, b=buf: p.write_bytes(b.getvalue()))
    atomic_write_json(folder / META, {"format": FORMAT, "format_version": FORMAT_VERSION, "saved": time.time(),
                                      **meta, "files": files, "sha256": hashes})
    return folder


def prune_checkpoints(output: str | Path, keep_last: int, warn: Optional[Callable[[str], None]] = None) -> list[Path]:
    """Keep the newest `keep_last` verified checkpoints; delete every older step folder, and incomplete or damaged
    ones older than the newest verified checkpoint. Deletes nothing when the newest checkpoint (the newest folder
    with a meta.json) fails verification: a damaged newer checkpoint must never cost the good ones. Folders newer
    than the newest verified one (being written) are left alone. Returns the removed folders."""
    folders = step_folders(output)
    kept: list[int] = []
    for step, folder in reversed(folders):
        if len(kept) >= max(keep_last, 1):
            break
        if not (folder / META).exists():
            continue
        _, problem = check_checkpoint(folder)
        if problem is None:
            kept.append(step)
        elif not kept:
            if warn is not None:
                warn(f"not pruning old checkpoints: the newest is damaged: {problem}")
            return []
        elif warn is not None:
            warn(f"removing damaged checkpoint {folder}: {problem}")
    if not kept:
        return []
    removed = [p for step, p in folders if step < kept[0] and step not in kept]
    for p in removed:
        with contextlib.suppress(OSError):
            (p / META).unlink()                 # stops counting before its files go
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ---------------------------------------------------------------------------------------------------- reading

def load_weights(folder: Path, name: str = "model", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """NAME.safetensors as a state dict. A damaged file (the parser may raise anything) or NaN/inf among the weights
    is a UserError naming the file."""
    from safetensors.torch import load_file

    path = Path(folder) / f"{name}.safetensors"
    try:
        state = load_file(str(path), device=str(device))
    except Exception as e:                      # SafetensorError derives from Exception only
        raise UserError(f"{path}: cannot read the weights, damaged or not a safetensors file ({type(e).__name__}: "
                        f"{_first_line(e)})") from None
    return _finite(path, state, "weights")


def load_state(folder: Path, name: str) -> Any:
    """A NAME.pt file, refusing anything but tensors and plain data (weights_only=True: no code is run). A damaged
    file or NaN/inf among its tensors is a UserError naming the file."""
    path = Path(folder) / f"{name}.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln]
        if not lines:                           # not a refused class: bytes that are no valid pickle
            raise UserError(f"{path}: cannot load, damaged or not a torch file ({_weights_only_reason(e)})") from None
        raise UserError(f"{path}: cannot load: it holds more than tensors and plain data, refused under "
                        f"weights_only ({lines[0].strip()[:160]})") from None
    except Exception as e:                      # a damaged zip or pickle can raise nearly anything
        raise UserError(f"{path}: cannot load, damaged or not a torch file ({type(e).__name__}: "
                        f"{_first_line(e)})") from None
    return _finite(path, state, "state")


def _finite(path: Path, state: Any, what: str) -> Any:
    """`state` itself, or a UserError naming the file when any of its tensors holds NaN or inf."""
    bad = nonfinite_tensors(state)
    if bad:
        raise UserError(f"{path}: {len(bad)} tensor(s) hold NaN or inf (e.g. {bad[0]}): {what} of a diverged run or "
                        f"a damaged file")
    return state


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def _weights_only_reason(e: BaseException) -> str:
    """The line of torch's long weights_only message that says what was wrong."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    after = [ln for i, ln in enumerate(lines) if i and "WeightsUnpickler error" in lines[i - 1]]
    return (after or lines or ["unreadable"])[0][:160]


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


# ---------------------------------------------------------------------------------------------------- full state
# Checkpoints hold full state dicts whatever the parallelism (torch.distributed.checkpoint.state_dict gathers FSDP2's
# shards), so a checkpoint trained with one parallelism or world size loads into another, and prep/eval read it
# without ranks.

def _options(cpu_offload: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def full_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> tuple[dict, Optional[dict]]:
    """(model weights, optimizer state) as full tensors keyed by parameter names (no 'module.' prefixes).

    Collective under FSDP2: every rank must call it; ranks other than 0 get empty dicts then."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_options())
    optim = get_optimizer_state_dict(model, optimizer, options=_options()) if optimizer is not None else None
    return weights, optim


def load_full_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], weights: dict[str, Any],
                    optim: Optional[dict[str, Any]] = None) -> None:
    """Load full state dicts (as full_state returned them) into a possibly wrapped model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, weights, options=_options(False))
    if optimizer is not None and optim is not None:
        set_optimizer_state_dict(model, optimizer, optim, options=_options(False))
        for group in optimizer.param_groups:    # the state-dict round trip turns tuples (betas) into lists
            for key, value in group.items():
                if isinstance(value, list) and key != "params":
                    group[key] = tuple(value)

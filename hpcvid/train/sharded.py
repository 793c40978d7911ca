"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), in the same step folders, with the same
meta.json, verification and pruning as hpcvid.train.checkpoint.

    OUTPUT/checkpoints/step-000500/
        dcp/.metadata, dcp/__<rank>_<n>.distcp     model, optimizer and EMA state, each rank writing its shards
        ema.safetensors                            the EMA weights, full, for inference (no ranks, no pickle)
        meta.json                                  step, data position, spec, every file's size and sha256: LAST

DCP writes each rank's shards in parallel and loads them into any number of ranks (it reshards), which is what lets
a run resume on a different allocation. The folder counts only once meta.json exists, and is trusted only when
every file matches its sha256 (hpcvid.train.checkpoint.check_checkpoint): DCP's .metadata is a pickle, so the hash
check is also what stands between a resume and a file someone else wrote; share weights as the safetensors export.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from hpcvid.io import atomic_write_json
from hpcvid.train.checkpoint import FORMAT, FORMAT_VERSION, META, file_sha256, save_hashed

DCP_DIR = "dcp"


def save_sharded(folder: Path, state: dict[str, Any], meta: dict[str, Any], comm,
                 exports: Optional[dict[str, dict[str, torch.Tensor]]] = None) -> Path:
    """Collective: every rank calls it with its own `state` (DTensor shards under FSDP2); rank 0 writes `exports`
    (name -> full state dict, as NAME.safetensors) and then meta.json with every file's size and sha256."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    folder = Path(folder)
    if comm.rank == 0:                 # a redone step: the old meta.json stops counting first, its shards go
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            (folder / META).unlink()
        shutil.rmtree(folder / DCP_DIR, ignore_errors=True)
    comm.barrier()
    dcp.save(state, checkpoint_id=str(folder / DCP_DIR))
    comm.barrier()
    mine = {}                          # each rank hashes the shards it wrote (read back from the page cache)
    for path in sorted((folder / DCP_DIR).glob(f"__{comm.rank}_*")):
        mine[f"{DCP_DIR}/{path.name}"] = (path.stat().st_size, file_sha256(path))
    if comm.rank == 0:
        meta_file = folder / DCP_DIR / ".metadata"
        mine[f"{DCP_DIR}/.metadata"] = (meta_file.stat().st_size, file_sha256(meta_file))
    gathered = comm.all_gather(mine)
    if comm.rank == 0:
        files, hashes = {}, {}
        for part in gathered:
            for name, (size, digest) in part.items():
                files[name], hashes[name] = size, digest
        for name, weights in (exports or {}).items():
            file = f"{name}.safetensors"
            files[file], hashes[file] = save_hashed(folder / file,
                                                     lambda p, w=weights: save_file(w, str(p), {"format": FORMAT}))
        atomic_write_json(folder / META, {"format": FORMAT, "format_version": FORMAT_VERSION, "saved": time.time(),
                                          "sharded": True, **meta, "files": files, "sha256": hashes})
    comm.barrier()
    return folder


def load_sharded(folder: Path, state: dict[str, Any]) -> None:
    """Fill `state` (the same structure as saved, this run's sharding) in place from a verified checkpoint."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=str(Path(folder) / DCP_DIR))

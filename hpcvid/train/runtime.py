"""What every training stage decides the same way: the device, CPU threads, per-step seeds, learning-rate schedule,
and a config dataclass from a preset with overrides."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import typing
from typing import Any, Iterator, Optional

import torch

from hpcvid.config import UserError
from hpcvid.dist import Env, destroy_torch_distributed, init_torch_distributed, rank_cores


def pick_device(choice: str, env: Env) -> torch.device:
    """'auto': the GPU of the rank's local index when torch sees one, else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device: 'cuda' asked for, but torch sees no GPU (use device: auto or cpu)")
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def cpu_threads(env: Env, asked: Optional[int]) -> int:
    return asked or rank_cores(env)


@contextlib.contextmanager
def training_process(name: str, env: Env, comm, device_choice: str, threads: Optional[int]) -> Iterator[torch.device]:
    """A training stage's process: its device (and CPU threads), torch.distributed up (gloo, NCCL on GPUs) for the
    stage and down again after it, unless a launcher had brought it up already."""
    device = pick_device(device_choice, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cpu_threads(env, threads))
        if env.is_main and device_choice == "auto":
            print(f"hpcvid {name}: no GPU visible: training on the CPU in fp32", file=sys.stderr, flush=True)
    owns_group = not torch.distributed.is_initialized()
    init_torch_distributed(env, comm, backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        if owns_group:
            destroy_torch_distributed(comm)


def step_seed(seed: int, step: int, rank: int) -> int:
    """One generator seed per (run seed, step, rank): what makes a resumed run draw what the uninterrupted one did,
    so no RNG state needs saving."""
    return ((seed * 1_000_003 + step) * 10_007 + rank) % (2 ** 63)


def warmup_cosine(step: int, lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 over `warmup` steps, then cosine from lr down to min_lr at `total`."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def config_with(base: Any, overrides: dict[str, Any], where: str) -> Any:
    """A frozen config dataclass with single fields replaced (YAML lists become the tuples the configs hold); an
    unknown field or a value the config refuses is a UserError naming `where`."""
    names = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(f"{where}: {unknown[0]!r} is not a {type(base).__name__} field; fields: "
                        f"{', '.join(sorted(names))}")
    hints = typing.get_type_hints(type(base))
    values = {k: tuple(v) if typing.get_origin(hints[k]) is tuple and isinstance(v, list) else v
              for k, v in overrides.items()}
    try:
        return dataclasses.replace(base, **values)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 8) -> float:
    """Achieved TFLOP/s of a square matmul here: the reference for MFU when no peak is given (a CPU has no
    datasheet figure that torch reaches)."""
    import time

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b                                                     # warm-up (allocations, kernel choice)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12

"""Data parallelism for training, applied to a model from outside it.

    mesh = data_mesh(device)                               # one dimension: every rank holds a shard / a replica
    model = parallelize(model, "ddp" | "fsdp2", device, mesh, mixed_precision=False)

The order matters and is fixed here: FSDP2 on each sharding unit, children before their parents as fully_shard
requires, then on the root, which takes what is left (stems, heads). Which submodules are units is declared per
model family in SHARDING_UNITS, not guessed from attribute names.
The process group must be up (torch.distributed) before parallelize is called.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from hpcvid.models.cmd import CMDAutoencoder
from hpcvid.models.dit import DiT
from hpcvid.models.reducio import ReducioVAE


def _reducio_units(model: ReducioVAE) -> list[nn.Module]:
    return [*model.encoder.levels, *model.content_encoder.levels, *model.decoder.levels]


def _cmd_units(model: CMDAutoencoder) -> list[nn.Module]:
    return [*model.encoder.blocks, *model.decoder.blocks]


# model family -> its FSDP2 units: the blocks whose parameters are gathered just before they run and freed after
SHARDING_UNITS: dict[type, Callable[[nn.Module], list[nn.Module]]] = {
    ReducioVAE: _reducio_units,
    CMDAutoencoder: _cmd_units,
    DiT: lambda model: list(model.blocks),
}


def sharding_units(model: nn.Module) -> list[nn.Module]:
    for cls, units in SHARDING_UNITS.items():
        if isinstance(model, cls):
            return units(model)
    raise ValueError(f"FSDP2: no sharding units declared for {type(model).__name__} (hpcvid.parallel.fsdp."
                     f"SHARDING_UNITS); declare its blocks there")


def data_mesh(device: torch.device):
    """A one-dimensional device mesh over every rank of the default process group."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (torch.distributed.get_world_size(),))


def parallelize(model: nn.Module, how: str, device: torch.device, mesh=None,
                mixed_precision: bool = False) -> nn.Module:
    """Wrap `model` (already on `device`) for data-parallel training.

    ddp:   one replica per rank, gradients all-reduced during backward.
    fsdp2: parameters sharded over `mesh` (default: data_mesh(device)) by fully_shard on each unit, then the root;
           mixed_precision: parameters gathered and computed in bf16, gradients reduced in fp32 (on GPUs; on this
           CPU bf16 was ~10x slower). Inputs are NOT cast (a DiT's timestep in bf16 would move by ~0.004): run the
           forward pass under torch.autocast(bfloat16), which casts at each matmul.
    """
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if how == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = mesh if mesh is not None else data_mesh(device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                      cast_forward_inputs=False) if mixed_precision else MixedPrecisionPolicy()
        for unit in reversed(sharding_units(model)):     # declared outermost first: reversed puts children first
            if any(p.requires_grad for p in unit.parameters()):
                fully_shard(unit, mesh=mesh, mp_policy=policy)
        # the models return dicts holding views; nothing here modifies them in place, which is what FSDP2 warns of
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    raise ValueError(f"parallel: {how!r} is not one of 'ddp', 'fsdp2'")


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 wraps in place: the model itself)."""
    return getattr(model, "module", model)

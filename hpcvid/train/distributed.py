"""Data parallelism applied to a model from outside it, and full (unsharded) state dicts for checkpoints.

    model = parallelize(model, "ddp" | "fsdp2", device)
    weights, optim = full_state(model, optimizer)      # collective; full tensors on rank 0 only (FSDP2) / every rank
    load_full_state(model, optimizer, weights, optim)  # every rank passes the same full dicts

Checkpoints hold full state dicts in both cases (torch.distributed.checkpoint.state_dict gathers FSDP2's shards), so
a checkpoint trained with one parallelism or world size loads into another, and prep/eval read it without ranks.
The process group must be up (torch.distributed) before parallelize is called.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn


def parallelize(model: nn.Module, how: str, device: torch.device) -> nn.Module:
    """Wrap `model` (already on `device`) for data-parallel training over the default process group.

    ddp:   one replica per rank, gradients all-reduced during backward.
    fsdp2: parameters sharded over the ranks (fully_shard); each element of the models' `levels`/`blocks` module
           lists is its own unit (gathered just before it runs, freed after), children before their parents as
           FSDP2 requires, then the root takes the remaining parameters (stems, middle blocks, heads).
    """
    dist = torch.distributed
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if how == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        units = [m for name, lst in model.named_modules() if isinstance(lst, nn.ModuleList)
                 and name.rsplit(".", 1)[-1] in ("levels", "blocks") for m in lst]
        for unit in reversed(units):          # named_modules is pre-order: reversed puts children first
            if any(p.requires_grad for p in unit.parameters()):
                fully_shard(unit, mesh=mesh)
        # the models return dicts holding views; nothing here modifies them in place, which is what FSDP2 warns of
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"parallel: {how!r} is not one of 'ddp', 'fsdp2'")


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

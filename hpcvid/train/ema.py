"""An exponential moving average of a model's weights, kept beside the model in the same sharding.

    ema = EMA(model, decay=0.999)
    ema.update(model)               # after every optimizer step
    ema.state_dict()                # {parameter name: tensor}: DTensor shards under FSDP2, for torch.distributed.checkpoint
    ema.full_state_dict()           # collective under FSDP2: full tensors on every rank, e.g. to export for inference

Under FSDP2 each rank averages only its own shard of every parameter (the average is elementwise), so the EMA costs
one extra copy of a rank's shard, not of the model.
"""
from __future__ import annotations

import torch
from torch import nn


def _named_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter names without DDP's 'module.' prefix, as checkpoints and the unwrapped model spell them."""
    inner = getattr(model, "module", model)
    return dict(inner.named_parameters())


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in _named_parameters(model).items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow = decay * shadow + (1 - decay) * weights, for every parameter (decay 0: a copy)."""
        params = _named_parameters(model)
        for name, shadow in self.shadow.items():
            shadow.lerp_(params[name].detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[0]}")
        for name, shadow in self.shadow.items():
            shadow.copy_(state[name])

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors on the CPU (gathering FSDP2 shards: every rank must call it)."""
        out = {}
        for name, shadow in self.shadow.items():
            full = shadow.full_tensor() if hasattr(shadow, "full_tensor") else shadow
            out[name] = full.detach().to("cpu").contiguous()
        return out

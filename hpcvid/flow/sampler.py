"""Euler sampling of a pyramidal (or full) flow, and classifier-free guidance (METHODS.md §3).

The model is any callable velocity_fn(x, t, factor) -> dx/dt, with x (B, C, T, H/factor, W/factor), t (B,) the
global timestep and factor the stage's spatial downsampling factor. Text conditioning and guidance are the caller's:

    def velocity_fn(x, t, factor):
        cond, uncond = model(x, t, factor, text), model(x, t, factor, null_text)
        return combine_guidance(cond, uncond, scale=7.0)
    video = sample(make_flow("pyramidal"), velocity_fn, (B, C, T, H, W), steps=20, generator=g)

This file imports torch and hpcvid.flow.pyramid only.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from hpcvid.flow.pyramid import PyramidalFlow, standard_normal

VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
KeepFn = Callable[[torch.Tensor, float, int], torch.Tensor]     # (x, t, stage) -> x with the known parts put back
DEFAULT_STEPS = 20                  # METHODS.md §3: 20 Euler steps per stage for an image unit


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale (cond - uncond); scale 1 is the conditional model alone."""
    return uncond + scale * (cond - uncond)


def steps_per_stage(flow: PyramidalFlow, steps: Union[int, Sequence[int]]) -> tuple[int, ...]:
    """Euler steps for each stage, indexed like the stages (0 = full resolution); an int means the same for all."""
    per_stage = (steps,) * flow.num_stages if isinstance(steps, int) else tuple(steps)
    if len(per_stage) != flow.num_stages or any(not isinstance(n, int) or n < 1 for n in per_stage):
        raise ValueError(f"steps = {steps!r}: need a positive int or one positive int per stage "
                         f"({flow.num_stages}, index 0 = full resolution)")
    return per_stage


@torch.no_grad()
def sample(flow: PyramidalFlow, velocity_fn: VelocityFn, shape: Sequence[int],
           steps: Union[int, Sequence[int]] = DEFAULT_STEPS, generator: Optional[torch.Generator] = None,
           device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
           keep: Optional[KeepFn] = None) -> torch.Tensor:
    """Generate a batch of full shape (B, C, T, H, W): pure noise at the lowest stage, Euler steps in global t
    through every stage's window, and a jump (upsample + renoise) between stages.

    The t handed to velocity_fn keeps at least float32 precision; the state x is kept in `dtype`. `keep(x, t,
    stage)` (see `KnownFrames`) is applied to every state the sampler reaches, at its time and stage: frames known
    in advance (a user's first image, the frames a sliding window shares with the previous one) follow their own
    path and end exactly at their values.
    """
    flow.check_shape(shape)
    per_stage = steps_per_stage(flow, steps)
    t_dtype = torch.promote_types(dtype, torch.float32)
    batch = shape[0]
    lowest = flow.num_stages - 1
    keep = keep or (lambda x, t, stage: x)
    x = standard_normal(flow.stage_shape(shape, lowest), generator, device, dtype)   # (B, C, T, h, w), t = 0
    x = keep(x, flow.windows[lowest][0], lowest)
    for k in range(lowest, -1, -1):
        s, e = flow.windows[k]
        times = torch.linspace(s, e, per_stage[k] + 1, dtype=torch.float64).tolist()
        factor = flow.factor(k)
        for t_now, t_next in zip(times[:-1], times[1:]):
            t = torch.full((batch,), t_now, dtype=t_dtype, device=x.device)            # (B,)
            x = keep(x + (t_next - t_now) * velocity_fn(x, t, factor), t_next, k)       # (B, C, T, h, w)
        if k > 0:
            x = keep(flow.jump(x, k, generator), flow.windows[k - 1][0], k - 1)        # (B, C, T, 2h, 2w)
    return x                                                                            # (B, C, T, H, W)


class KnownFrames:
    """A `keep` for `sample`: frames whose clean values are known are set, at every state, to the flow's own path
    point for those values (one fixed noise draw), so the generated frames around them are denoised against a
    consistent context (the replacement method of inpainting; StreamingT2V-style continuation uses it too).

        keep = KnownFrames(flow, values, index=[0], generator=g)     # values (B, C, len(index), H, W), clean
        video = sample(flow, velocity_fn, shape, keep=keep)           # video[:, :, 0] == values[:, :, 0]

    index defaults to the first values.shape[2] frames, batch (the rows of x they belong to) to the first B rows.
    """

    def __init__(self, flow: PyramidalFlow, values: torch.Tensor, index: Optional[Sequence[int]] = None,
                 generator: Optional[torch.Generator] = None, batch: Optional[Sequence[int]] = None):
        index = list(range(values.shape[2])) if index is None and values.dim() == 5 else index
        if values.dim() != 5 or index is None or values.shape[2] != len(index):
            raise ValueError(f"KnownFrames: values must be (B, C, len(index), H, W) for index {index}, got "
                             f"{tuple(values.shape)}")
        self.flow, self.values, self.index = flow, values, list(index)
        self.batch = list(range(values.shape[0])) if batch is None else list(batch)
        self.noise = standard_normal(values.shape, generator, values.device, values.dtype)

    def __call__(self, x: torch.Tensor, t: float, stage: int) -> torch.Tensor:
        start, end = self.flow.endpoints(self.values, self.noise, stage)             # (b, C, n, h, w) each
        tt = torch.full((self.values.shape[0],), t, dtype=torch.float64, device=x.device)
        point = self.flow.point(start, end, stage, tt).to(x.dtype)                   # (b, C, n, h, w)
        x = x.clone()
        rows = torch.tensor(self.batch, device=x.device)[:, None]
        x[rows, :, torch.tensor(self.index, device=x.device)[None]] = point.transpose(1, 2)   # (b, n, C, h, w)
        return x

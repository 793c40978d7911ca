"""Pyramidal flow matching (METHODS.md §3): stage windows, the piecewise-straight path, training pairs, jump renoising.

t is the weight on clean data (t = 0 pure noise, t = 1 data). Data are (B, C, T, H, W); the pyramid acts on H and W
only. Stage k (k = 0 full resolution, k = K-1 the lowest, 1/2^(K-1)) covers the window [s_k, e_k] of t and lives at
H/2^k x W/2^k. With n_k = 2^k Down(n, 2^k), the stage-k view of one shared full-resolution noise n (variance 1):

    start  x(s_k) = s_k Up(Down(x1, 2^(k+1))) + (1 - s_k) n_k        (pure noise n_k on the lowest stage, s = 0)
    end    x(e_k) = e_k Down(x1, 2^k)         + (1 - e_k) n_k
    path   x(t)   = (1 - f) x(s_k) + f x(e_k),  f = (t - s_k) / (e_k - s_k)
    target v      = d x / d t = (x(e_k) - x(s_k)) / (e_k - s_k)       (per unit of GLOBAL t, see below)

Target convention: the network is told the global t, so it regresses dx/dt with respect to that same t, and the
sampler takes Euler steps x += (t' - t) v in it. One rule then serves every stage and the one-stage full flow (whose
target is the familiar x1 - n), and the noise part of every target is exactly -n_k, the same O(1) scale on all
stages; the paper's "end - start" (per unit of in-stage fraction) would shrink with the window's width. A trainer
that wants the paper's scale multiplies the MSE of stage k by (e_k - s_k)^2.

Down is average pooling over f x f blocks: for exact integer factors it is area (box) downsampling, which is what
"bilinear downsampling by f" means without ambiguity (plain bilinear sampling at factor 4 reads only 2 of every 4
rows). Pooling composes exactly (Down(Down(x, 2), 2) = Down(x, 4)), keeps i.i.d. noise i.i.d. with variance 4^-k
(hence the x2 per halving), and is the block mean that nearest-neighbour Up repeats: the jump algebra relies on that.

Jump renoising: see `jump_coefficients`. The paper's formula holds exactly only when the end of stage k+1 and the
start of stage k are related by e_(k+1) = 2 s_k / (1 + s_k); with windows that simply split [0, 1] into touching
thirds it gives the wrong marginal. The default windows therefore keep the equal split as the stage ENDS and pull
each start back to s_k = e_(k+1) / (2 - e_(k+1)) (K = 3: [0, 1/3], [1/5, 2/3], [1/2, 1]).

The full-resolution flow is the one-stage pyramid: make_flow("full") (x_t = t x1 + (1 - t) n, target x1 - n).
Sampling lives in hpcvid/flow/sampler.py. This file imports torch only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

FLOW_KINDS = ("pyramidal", "full")
DEFAULT_STAGES = 3                  # METHODS.md §3: 1/4, 1/2, 1 of the full latent resolution
PAPER_BLOCK_G = 1.0 / 3.0           # METHODS.md §3: pairwise correlation -1/3 inside a 2x2 block of jump noise
WINDOW_SLACK = 1e-9                 # rounding allowance when checking that a jump can be made exact

Window = tuple[float, float]        # (s_k, e_k): the t-window of one stage
PatchSize = Union[int, Sequence[int]]


# ---------------------------------------------------------------------------------------------------- resampling

def down(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Area downsampling of the last two axes by `factor` (mean of each factor x factor block)."""
    if factor == 1:
        return x
    *lead, H, W = x.shape
    if H % factor or W % factor:
        raise ValueError(f"down: spatial size {H}x{W} is not divisible by the factor {factor}")
    blocks = x.reshape(*lead, H // factor, factor, W // factor, factor)   # (..., h, f, w, f)
    return blocks.mean(dim=(-3, -1))                                      # (..., h, w)


def up2(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour upsampling of the last two axes by 2: every value becomes a 2x2 block."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)    # (..., 2h, 2w)


def stage_noise(noise: torch.Tensor, stage: int) -> torch.Tensor:
    """n_k = 2^k Down(n, 2^k): the full-resolution noise seen at stage k, rescaled so its variance stays 1."""
    factor = 2 ** stage
    return down(noise, factor) * factor                                   # (..., H/2^k, W/2^k)


# ---------------------------------------------------------------------------------------------------- random draws

def standard_normal(shape: Sequence[int], generator: Optional[torch.Generator] = None,
                    device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, 1) draws made on the generator's device, then moved to `device`.

    So a CPU generator gives the same numbers whatever device the data lives on (a CUDA generator avoids the copy).
    """
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def uniform(shape: Sequence[int], generator: Optional[torch.Generator] = None,
            device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) draws, made like `standard_normal`."""
    draw_device = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def block_noise_factor(g: float) -> torch.Tensor:
    """A 4x4 matrix L with L L^T = (1 + g) I - g 11^T, the covariance of the 4 entries of one 2x2 block.

    The covariance has two eigenspaces: the block mean (eigenvalue 1 - 3g) and its complement (1 + g). At the paper's
    g = 1/3 the first is 0, the matrix is singular and Cholesky fails, so L is the symmetric square root built from
    the two projections.
    """
    if not 0.0 <= g <= PAPER_BLOCK_G + WINDOW_SLACK:
        raise ValueError(f"block noise: g = {g} must be in [0, 1/3] (above 1/3 the covariance (1+g)I - g11^T has a "
                         f"negative eigenvalue 1 - 3g)")
    mean_projection = torch.full((4, 4), 0.25, dtype=torch.float64)       # (4, 4): onto the block mean
    detail_projection = torch.eye(4, dtype=torch.float64) - mean_projection
    return math.sqrt(1.0 + g) * detail_projection + math.sqrt(max(1.0 - 3.0 * g, 0.0)) * mean_projection


def block_noise(shape: Sequence[int], g: float, generator: Optional[torch.Generator] = None,
                device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise of `shape` (..., H, W), unit variance, pairwise correlation -g inside every 2x2 block.

    Blocks are independent of each other. All blocks come from one draw (..., H/2, W/2, 4) times one 4x4 factor.
    """
    *lead, H, W = shape
    if H % 2 or W % 2:
        raise ValueError(f"block noise: spatial size {H}x{W} must be even (2x2 blocks)")
    h, w = H // 2, W // 2
    factor = block_noise_factor(g).to(device=device, dtype=dtype)                       # (4, 4), symmetric
    z = standard_normal((*lead, h, w, 4), generator, device, dtype)                      # (..., h, w, 4)
    blocks = (z @ factor).reshape(*lead, h, w, 2, 2)                                     # (..., h, w, dy, dx)
    n = len(lead)
    blocks = blocks.permute(*range(n), n, n + 2, n + 1, n + 3)                           # (..., h, dy, w, dx)
    return blocks.reshape(*lead, H, W)                                                   # (..., H, W)


def text_dropout_mask(batch_size: int, p: float = 0.1, generator: Optional[torch.Generator] = None,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """(B,) bool, True where a sample's text is dropped, so the model also learns the unconditional velocity (CFG)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"text dropout probability p = {p} must be in [0, 1] (METHODS.md §3 uses 0.1)")
    return uniform((batch_size,), generator, device) < p                               # (B,)


# ---------------------------------------------------------------------------------------------------- windows

def jump_coefficients(end: float, start: float) -> tuple[float, float, float]:
    """(a, b, g) so that a Up(x(e)) + b n', with n' block noise of parameter g, has the start marginal at `start`.

    x(e) = e D + (1 - e) m with m i.i.d. unit noise at the low resolution; we need s U + (1 - s) (i.i.d. unit noise)
    at the high one, U = Up(D). Up(m) is perfectly correlated inside each 2x2 block, so per block (J = 11^T):
        mean:        a e = s                                     -> a = s / e
        covariance:  a^2 (1 - e)^2 J + b^2 ((1 + g) I - g J) = (1 - s)^2 I
                     -> b^2 (1 + g) = (1 - s)^2   and   b^2 g = c^2,   c = a (1 - e)
    so b^2 = (1 - s)^2 - c^2 and g = c^2 / b^2. Block noise needs g <= 1/3, i.e. c <= (1 - s) / 2, i.e.
    e >= 2 s / (1 + s). At equality g = 1/3, a = (1 + s)/2, b = sqrt(3)(1 - s)/2: the paper's formula. With touching
    windows (e = s) a = 1 and no added noise can remove the block correlation of Up(m): no exact jump exists.
    """
    if not 0.0 < end <= 1.0 or not 0.0 <= start < 1.0:
        raise ValueError(f"jump from t = {end} to t = {start}: need 0 < end <= 1 and 0 <= start < 1")
    if start > end / (2.0 - end) + WINDOW_SLACK:
        raise ValueError(f"jump from t = {end} to t = {start} cannot keep the start marginal: the next stage must "
                         f"start at s <= e / (2 - e) = {end / (2.0 - end):.6g} (equivalently e >= 2s / (1 + s)); "
                         f"move that stage's start down or the previous stage's end up")
    a = start / end
    c = a * (1.0 - end)
    b = math.sqrt((1.0 - start) ** 2 - c ** 2)
    g = min(c ** 2 / b ** 2, PAPER_BLOCK_G)    # rounding can push the tight case a hair over 1/3
    return a, b, g


def default_windows(num_stages: int = DEFAULT_STAGES) -> tuple[Window, ...]:
    """Windows indexed by stage k (0 = full resolution): ends at the equal split of [0, 1], starts pulled back so
    every jump is exact with the paper's g = 1/3 (s_k = e_(k+1) / (2 - e_(k+1))). K = 3: (1/2, 1), (1/5, 2/3), (0, 1/3).
    """
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
    K = num_stages
    ends = [(K - k) / K for k in range(K)]                    # e_0 = 1 ... e_(K-1) = 1/K
    starts = [(K - 1 - k) / (K + 1 + k) for k in range(K)]    # e_(k+1) / (2 - e_(k+1)) in closed form; s_(K-1) = 0
    return tuple(zip(starts, ends))


def check_windows(windows: Sequence[Sequence[float]], num_stages: int) -> tuple[Window, ...]:
    """Validate per-stage windows (index k = 0 full resolution) and return them as float pairs."""
    windows = tuple((float(s), float(e)) for s, e in windows)
    if len(windows) != num_stages:
        raise ValueError(f"windows: need one (start, end) per stage ({num_stages}), got {len(windows)}: {windows}")
    for k, (s, e) in enumerate(windows):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(f"windows[{k}] = {(s, e)}: need 0 <= start < end <= 1")
    if windows[0][1] != 1.0 or windows[-1][0] != 0.0:
        raise ValueError(f"windows {windows}: the full-resolution stage 0 must end at t = 1 and the lowest stage "
                         f"{num_stages - 1} must start at t = 0 (pure noise)")
    for k in range(num_stages - 1):
        try:
            jump_coefficients(windows[k + 1][1], windows[k][0])
        except ValueError as err:
            raise ValueError(f"windows {windows}: stage {k + 1} -> {k}: {err}") from None
    return windows


# ---------------------------------------------------------------------------------------------------- the flow

@dataclass
class StageBatch:
    """The samples of one training batch assigned to one stage, at that stage's resolution."""
    x_t: torch.Tensor        # (B_k, C, T, H/2^k, W/2^k) noisy input
    target: torch.Tensor     # (B_k, C, T, H/2^k, W/2^k) velocity dx/dt (per unit of global t)
    t: torch.Tensor          # (B_k,) global timestep, inside the stage's window
    stage: int               # k, 0 = full resolution
    index: torch.Tensor      # (B_k,) long: where these samples sit in the original batch (pick their text with it)
    factor: int              # 2^k, the spatial downsampling factor (the model interpolates positions with it)


class PyramidalFlow:
    """The pyramidal flow of METHODS.md §3 with K stages; K = 1 is the plain full-resolution flow.

        flow = make_flow("pyramidal")
        for sb in flow.training_batches(x1, generator):          # x1 (B, C, T, H, W)
            v = model(sb.x_t, sb.t, sb.factor, text[sb.index])
            loss = loss + ((v - sb.target) ** 2).mean() * len(sb.index) / len(x1)   # every sample weighs the same
        video = sample(flow, velocity_fn, x1.shape, steps=20, generator=g)   # hpcvid.flow.sampler
    """

    def __init__(self, num_stages: int = DEFAULT_STAGES, windows: Optional[Sequence[Window]] = None):
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
        self.num_stages = num_stages
        self.windows = check_windows(default_windows(num_stages) if windows is None else windows, num_stages)

    @property
    def kind(self) -> str:
        return "full" if self.num_stages == 1 else "pyramidal"

    def __repr__(self) -> str:
        return f"PyramidalFlow(num_stages={self.num_stages}, windows={self.windows})"

    # ---- shapes

    def factor(self, stage: int) -> int:
        """Spatial downsampling factor of stage k."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} does not exist: this flow has stages 0..{self.num_stages - 1}")
        return 2 ** stage

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raise ValueError unless `shape` is (B, C, T, H, W) with H and W divisible by the lowest stage's factor."""
        if len(shape) != 5:
            raise ValueError(f"{self.kind} flow: expected data (B, C, T, H, W), got shape {tuple(shape)}")
        lowest = 2 ** (self.num_stages - 1)
        if shape[-2] % lowest or shape[-1] % lowest:
            raise ValueError(f"{self.kind} flow with {self.num_stages} stages: H x W = {shape[-2]}x{shape[-1]} must "
                             f"be divisible by 2^(K-1) = {lowest}; crop/pad the data or use fewer stages")

    def stage_shape(self, shape: Sequence[int], stage: int) -> tuple[int, ...]:
        """(B, C, T, H/2^k, W/2^k) for a full shape (B, C, T, H, W)."""
        f = self.factor(stage)
        return (*shape[:-2], shape[-2] // f, shape[-1] // f)

    # ---- the path

    def endpoints(self, x1: torch.Tensor, noise: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x(s_k), x(e_k)) at stage k's resolution, from full-resolution data and noise (B, C, T, H, W)."""
        self.check_shape(x1.shape)
        s, e = self.windows[stage]
        f = self.factor(stage)
        n_k = stage_noise(noise, stage)                                          # (B, C, T, H/f, W/f)
        end = e * down(x1, f) + (1.0 - e) * n_k                                  # (B, C, T, H/f, W/f)
        if s == 0.0:
            start = n_k                                                          # pure noise: no coarser stage to read
        else:
            start = s * up2(down(x1, 2 * f)) + (1.0 - s) * n_k                   # (B, C, T, H/f, W/f)
        return start, end

    def point(self, start: torch.Tensor, end: torch.Tensor, stage: int, t: torch.Tensor) -> torch.Tensor:
        """x(t) on stage k's straight segment; t (B,). Written (1 - f) start + f end so t = s and t = e are exact."""
        s, e = self.windows[stage]
        frac = ((t - s) / (e - s)).to(start.dtype).view(-1, *[1] * (start.dim() - 1))   # (B, 1, 1, 1, 1)
        return (1.0 - frac) * start + frac * end                                         # (B, C, T, h, w)

    def velocity(self, start: torch.Tensor, end: torch.Tensor, stage: int) -> torch.Tensor:
        """The regression target dx/dt on stage k (per unit of global t, see the module docstring)."""
        s, e = self.windows[stage]
        return (end - start) / (e - s)                                                   # (B, C, T, h, w)

    # ---- training

    def assign_stages(self, batch_size: int, generator: Optional[torch.Generator] = None,
                      device: Optional[torch.device] = None) -> torch.Tensor:
        """(B,) long stage of every sample: a seeded permutation dealt round-robin, so counts differ by at most one
        (stage k gets ceil((B - k) / K)) and which sample lands where does not depend on its place in the batch."""
        draw_device = generator.device if generator is not None else device
        order = torch.randperm(batch_size, generator=generator, device=draw_device).to(device)   # (B,)
        stage_of = torch.empty(batch_size, dtype=torch.long, device=device)
        stage_of[order] = torch.arange(batch_size, device=device) % self.num_stages
        return stage_of                                                                         # (B,)

    def training_batches(self, x1: torch.Tensor, generator: Optional[torch.Generator] = None,
                         noise: Optional[torch.Tensor] = None) -> list[StageBatch]:
        """Split a batch x1 (B, C, T, H, W) across the stages and build each sample's (x_t, target, t).

        One sub-batch per stage that received samples (stages differ in size, so they cannot be stacked); t is
        uniform in the stage's window. `noise` (full resolution, like x1) is drawn from `generator` when not given.
        t keeps at least float32 precision (timestep embeddings need it); everything else follows x1.
        """
        self.check_shape(x1.shape)
        B = x1.shape[0]
        t_dtype = torch.promote_types(x1.dtype, torch.float32)
        stage_of = self.assign_stages(B, generator, x1.device)                           # (B,)
        if noise is None:
            noise = standard_normal(x1.shape, generator, x1.device, x1.dtype)            # (B, C, T, H, W)
        elif noise.shape != x1.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have the data's shape {tuple(x1.shape)}")
        u = uniform((B,), generator, x1.device, t_dtype)                                 # (B,)
        batches = []
        for k, (s, e) in enumerate(self.windows):
            index = (stage_of == k).nonzero().squeeze(1)                                 # (B_k,)
            if index.numel() == 0:
                continue
            t = s + (e - s) * u[index]                                                   # (B_k,)
            start, end = self.endpoints(x1[index], noise[index], k)                      # (B_k, C, T, h, w) each
            batches.append(StageBatch(x_t=self.point(start, end, k, t), target=self.velocity(start, end, k),
                                      t=t, stage=k, index=index, factor=self.factor(k)))
        return batches

    # ---- sampling helpers

    def jump(self, x_end: torch.Tensor, stage: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """From the end of stage k (k >= 1) to the start of stage k-1: Up, then renoise (see `jump_coefficients`)."""
        if not 1 <= stage < self.num_stages:
            raise ValueError(f"jump: stage {stage} has no finer stage to jump to (stages 1..{self.num_stages - 1})")
        a, b, g = jump_coefficients(self.windows[stage][1], self.windows[stage - 1][0])
        upsampled = up2(x_end)                                                           # (B, C, T, 2h, 2w)
        fresh = block_noise(upsampled.shape, g, generator, x_end.device, x_end.dtype)    # (B, C, T, 2h, 2w)
        return a * upsampled + b * fresh

    # ---- cost

    def tokens_per_step(self, shape: Sequence[int], patch_size: PatchSize) -> int:
        """Tokens one training step feeds the model for a batch of full shape (B, C, T, H, W).

        patch_size: p (1 x p x p patches) or (pt, ph, pw). Stage counts follow `assign_stages`. For K = 3 and B a
        multiple of 3 the ratio to the full flow is (1 + 1/4 + 1/16) / 3 = 0.4375.
        """
        self.check_shape(shape)
        pt, ph, pw = (1, patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        B = shape[0]
        total = 0
        for k in range(self.num_stages):
            _, _, T, h, w = self.stage_shape(shape, k)
            if T % pt or h % ph or w % pw:
                raise ValueError(f"tokens_per_step: stage {k} has T x h x w = {T}x{h}x{w}, not divisible by the "
                                 f"patch {(pt, ph, pw)}")
            count = len(range(k, B, self.num_stages))            # samples dealt to stage k (see assign_stages)
            total += count * (T // pt) * (h // ph) * (w // pw)
        return total


def make_flow(kind: str, num_stages: Optional[int] = None,
              windows: Optional[Sequence[Window]] = None) -> PyramidalFlow:
    """The flow named `kind`: "pyramidal" (K stages, default 3) or "full" (one stage at full resolution)."""
    if kind == "pyramidal":
        return PyramidalFlow(DEFAULT_STAGES if num_stages is None else num_stages, windows)
    if kind == "full":
        if num_stages not in (None, 1) or windows is not None:
            raise ValueError(f"the full flow has one stage over [0, 1]; drop num_stages={num_stages!r} / "
                             f"windows={windows!r}, or use kind='pyramidal'")
        return PyramidalFlow(1)
    raise ValueError(f"unknown flow kind {kind!r}; choose one of {FLOW_KINDS}")

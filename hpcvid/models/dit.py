"""The video DiT family: one network, two uses (METHODS.md §5), trained with pyramidal flow matching (§3).

  keyframe model: text -> K content frames in PIXEL space (K = 1 is text-to-image), x (B, 3, K, H, W) in [-1, 1].
  motion model:   text + every clip's content frame (and the next clip's) -> the motion latents of K consecutive
                  clips, x (B, C_z, K T', h, w): K Reducio latents (C_z, T', h, w) concatenated along time.

Both predict a velocity of x's shape at a continuous timestep t in [0, 1] (t = 1 data). Tokens are 1 x p x p
patches; every block runs, each under DiT's adaLN-zero modulation from (timestep + pooled text):

    spatial self-attention within each frame -> TEMPORAL self-attention across frames at each position
    -> cross-attention to the text tokens (+ a learned null token) -> MLP

    model = DiT(DIT_PRESETS["keyframe-tiny"])
    v = model(x, t, text, text_mask)                     # x (B, 3, K, H, W); t (B,); text (B, L, D); mask (B, L) bool
    model = DiT(DIT_PRESETS["motion-tiny"])
    cond = MotionCond(frames, next_frame, has_next)      # (B, 3, K, H_px, W_px), (B, 3, H_px, W_px), (B,) bool
    v = model(z, t, text, text_mask, cond, spatial_factor=2)   # z at half the latent's full h x w

Pyramid stages: `spatial_factor` f = 2^k says that x is the full-resolution input downsampled by f; each token is
placed at the centre of the full-resolution region it covers (see `token_coords`), and the motion model always
takes full-resolution content frames and pools their features to x's grid the same way.

Temporal attention is replaceable from outside (the clip-parallel dual-scope attention of METHODS.md §4 does so):
every block calls `block.temporal(h)` with h (B * h * w, T, C): the normalised, modulated tokens of one spatial
position per row (rows in (b, y, x) order, frames in time order), and expects the attention output of the same
shape back; the block applies the gate and the residual. `temporal_attention_modules()` lists them,
`replace_temporal_attention(make)` installs replacements.

No noise schedules, ranks, optimizers or checkpoint files in here: the flow is hpcvid/flow, FSDP2 wraps the blocks
from outside (`model.sharding_units()`), and a trainer turns on recomputing the blocks in backward with
`model.recompute_blocks = True` (activation checkpointing that keeps parameter names). This file imports torch only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hpcvid.models.cmd import unpatchify_frames
from hpcvid.models.layers import NORM_EPS, Attention, Mlp, check_shape, pos_embed_3d_dims, sinusoidal_embedding

KINDS = ("keyframe", "motion")
TIME_SCALE = 1000.0      # t in [0, 1] is embedded as 1000 t: DiT's 1000-step timestep range, which the sin-cos
TIME_FREQ_DIM = 256      # frequencies (periods 1 .. 10^4) resolve; DiT's frequency-embedding size
INIT_STD = 0.02          # normal init of the timestep MLP and the null token (DiT / ViT convention)
RGB = 3                  # channels of a content frame


# ---------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class DiTConfig:
    """Sizes of a DiT. The temporal patch is 1 (one token row per frame); heads split the width evenly.

    Motion models only (a keyframe model builds none of it): frames_per_clip is T', the latent frames of one clip;
    content_scale is s, content-frame pixels per latent cell (Reducio's spatial factor); content_channels is the
    width of the content features that the stem puts on the latent grid.
    """
    kind: str = "keyframe"
    in_channels: int = 3
    patch_size: int = 8
    width: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    text_dim: int = 384            # MiniLM-L6 states, the encoder jobs/prep_*.yaml store; T5-XXL would be 4096
    frames_per_clip: int = 4
    content_scale: int = 32
    content_channels: int = 64

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"DiTConfig.kind must be one of {KINDS}, got {self.kind!r}")
        for key in ("in_channels", "patch_size", "width", "depth", "heads", "text_dim", "frames_per_clip",
                    "content_scale", "content_channels"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DiTConfig.{key} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"DiTConfig.width={self.width} must be divisible by heads={self.heads}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def cond_channels(self) -> int:
        """Channels concatenated to x before the patch embedding: own content, next content, next-present flag."""
        return 2 * self.content_channels + 1 if self.kind == "motion" else 0


DIT_PRESETS = {
    # CPU tests and the quickstart: 1-4 frames of 32x32 / 64x64 pixels -> 8x8 / 16x16 tokens per frame
    "keyframe-tiny": DiTConfig(kind="keyframe", in_channels=3, patch_size=4, width=128, depth=2, heads=2),
    # tiny Reducio latents (16, 4, 8, 8) of 16x64x64 clips: 8x8 tokens per latent frame, s = 64 / 8
    "motion-tiny": DiTConfig(kind="motion", in_channels=16, patch_size=1, width=128, depth=2, heads=2,
                             frames_per_clip=4, content_scale=8, content_channels=32),
    # 256x256 keyframes, patch 8: 32x32 = 1024 tokens per frame (DiT-XL/2's count at 512 px), 256 at 128 px and
    # 64 at 64 px on the pyramid's lower stages; patch dim 192 < width
    "keyframe-paper": DiTConfig(kind="keyframe", in_channels=3, patch_size=8, width=1152, depth=28, heads=16),
    # paper Reducio latents (16, 4, 8, 8) of 16x256x256 clips, s = 32. Patch 1, not 2: the latent is only 8x8, so
    # patch 2 would leave 4x4 tokens per frame at full resolution and ONE at the pyramid's 1/4 stage; patch 1 gives
    # 64 / 16 / 4 per frame, 256 tokens per clip at full resolution
    "motion-paper": DiTConfig(kind="motion", in_channels=16, patch_size=1, width=1152, depth=28, heads=16,
                              frames_per_clip=4, content_scale=32, content_channels=128),
}


@dataclass(frozen=True)
class MotionCond:
    """What the motion model reads besides the text, for a window of K consecutive clips.

    frames:     (B, 3, K, H, W) the content frame of every clip, at FULL resolution (H = h_full * content_scale),
                in [-1, 1]; the same at every pyramid stage.
    next_frame: (B, 3, H, W) the content frame of the clip after the window, or None.
    has_next:   (B,) bool, which samples have such a clip; default: all when next_frame is given, none otherwise.
    Inside the window, clip k's next frame is frames[:, :, k + 1].
    """
    frames: torch.Tensor
    next_frame: Optional[torch.Tensor] = None
    has_next: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------------------- positions

def token_coords(n: int, factor: int = 1, device: Optional[torch.device] = None) -> torch.Tensor:
    """(n,) float32 coordinates of the tokens along one spatial axis of a grid downsampled by `factor`.

    Unit: one full-resolution token; full-resolution token i sits at i. A token of the downsampled grid covers full
    tokens factor*i .. factor*i + factor - 1 and sits at their centre, factor*i + (factor - 1) / 2: exactly the mean
    of their coordinates (so the embedding of a coarse token is that of its region's centre, not a mean of embeddings).
    """
    return factor * torch.arange(n, device=device, dtype=torch.float32) + (factor - 1) / 2


def grid_coords(frames: int, height: int, width: int, factor: int = 1,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """(T*h*w, 3) float32 (t, y, x) of every token of a T x h x w token grid, t-major; t is the frame index."""
    t = torch.arange(frames, device=device, dtype=torch.float32)
    y, x = token_coords(height, factor, device), token_coords(width, factor, device)
    grid = torch.meshgrid(t, y, x, indexing="ij")                            # 3 x (T, h, w)
    return torch.stack(grid, dim=-1).reshape(frames * height * width, 3)    # (T*h*w, 3)


def pos_embed(frames: int, height: int, width: int, dim: int, factor: int = 1,
              device: Optional[torch.device] = None) -> torch.Tensor:
    """Fixed sin-cos embedding of `grid_coords`: (T*h*w, dim), [emb_t | emb_y | emb_x] split as layers.pos_embed_3d
    does (identical to it at factor 1)."""
    coords = grid_coords(frames, height, width, factor, device)              # (N, 3)
    dims = pos_embed_3d_dims(dim)
    return torch.cat([sinusoidal_embedding(coords[:, i], d) for i, d in enumerate(dims)], dim=-1)   # (N, dim)


# ---------------------------------------------------------------------------------------------------- blocks

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _layer_norm(width: int, affine: bool = False) -> nn.LayerNorm:
    return nn.LayerNorm(width, eps=NORM_EPS, elementwise_affine=affine)


class DiTBlock(nn.Module):
    """Spatial attention, temporal attention, text cross-attention, MLP over tokens (B, T, S, C), S = h*w.

    adaLN-zero as DiT places it, on every self-attention and the MLP: LayerNorm without affine, then shift/scale
    from the conditioning vector, and a gate on the residual branch; the modulation starts at zero, so the block
    starts as the identity. The cross-attention is pre-norm (affine LayerNorm) and ungated as in PixArt-alpha, its
    output projection zero-initialised so that it too starts silent.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        w, heads = config.width, config.heads
        self.norm_s, self.norm_t, self.norm_m = _layer_norm(w), _layer_norm(w), _layer_norm(w)
        self.spatial = Attention(w, heads=heads, head_dim=w // heads)
        self.temporal = Attention(w, heads=heads, head_dim=w // heads)   # replaceable: (B h w, T, C) -> same
        self.norm_c = _layer_norm(w, affine=True)
        self.cross = Attention(w, heads=heads, head_dim=w // heads)      # keys: null token + projected text
        self.mlp = Mlp(w, mlp_ratio=config.mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 9 * w))   # shift, scale, gate x (s, t, mlp)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor) -> torch.Tensor:
        B, T, S, C = x.shape
        mods = self.modulation(c)[:, None, None].chunk(9, dim=-1)             # 9 x (B, 1, 1, C)
        shift_s, scale_s, gate_s, shift_t, scale_t, gate_t, shift_m, scale_m, gate_m = mods
        h = modulate(self.norm_s(x), shift_s, scale_s).reshape(B * T, S, C)   # (B T, S, C): one frame per row
        x = x + gate_s * self.spatial(h).view(B, T, S, C)                     # (B, T, S, C)
        h = modulate(self.norm_t(x), shift_t, scale_t)                        # (B, T, S, C)
        h = h.transpose(1, 2).reshape(B * S, T, C)                            # (B S, T, C): one position per row
        out = self.temporal(h)                                                # (B S, T, C)
        if out.shape != h.shape:
            raise ValueError(f"DiTBlock: the temporal module must map (B*h*w, T, C) = {tuple(h.shape)} to the same "
                             f"shape, {type(self.temporal).__name__} returned {tuple(out.shape)}")
        x = x + gate_t * out.view(B, S, T, C).transpose(1, 2)                 # (B, T, S, C)
        q = self.norm_c(x).reshape(B, T * S, C)                               # (B, T S, C)
        x = x + self.cross(q, context, context_mask).view(B, T, S, C)         # (B, T, S, C)
        return x + gate_m * self.mlp(modulate(self.norm_m(x), shift_m, scale_m))   # (B, T, S, C)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map of every token to its patch's values (B, T, S, p*p*C_out)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        w = config.width
        self.norm = _layer_norm(w)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.linear = nn.Linear(w, config.patch_size ** 2 * config.in_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c)[:, None, None].chunk(2, dim=-1)    # 2 x (B, 1, 1, C)
        return self.linear(modulate(self.norm(x), shift, scale))             # (B, T, S, p*p*C_out)


class ContentStem(nn.Module):
    """Content frames (N, 3, H, W) -> features on the latent grid (N, C_c, H/s, W/s), average-pooled by the pyramid
    factor f to (N, C_c, H/(s f), W/(s f)).

    A conv with kernel = stride = s (a learned space-to-depth projection of each latent cell's s x s pixels), SiLU,
    and a 3x3 conv that lets a cell see its neighbours. Pooling is last and linear, so a coarse cell gets the mean of
    the features of the full-resolution cells it covers, as its position is their mean.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        s, cc = config.content_scale, config.content_channels
        self.proj = nn.Conv2d(RGB, cc, kernel_size=s, stride=s)
        self.mix = nn.Conv2d(cc, cc, kernel_size=3, padding=1)

    def forward(self, frames: torch.Tensor, factor: int) -> torch.Tensor:
        h = self.mix(F.silu(self.proj(frames)))                              # (N, C_c, H/s, W/s)
        return F.avg_pool2d(h, factor) if factor > 1 else h                  # (N, C_c, H/(s f), W/(s f))


# ---------------------------------------------------------------------------------------------------- the DiT

class DiT(nn.Module):
    """The keyframe / motion DiT; see the module docstring. forward returns a velocity of x's shape and dtype."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c, w, p = config, config.width, config.patch_size
        self.patch_embed = nn.Conv3d(c.in_channels + c.cond_channels, w, kernel_size=(1, p, p), stride=(1, p, p))
        self.content_stem = ContentStem(c) if c.kind == "motion" else None
        self.t_embed = Mlp(TIME_FREQ_DIM, w, w)                              # sin-cos of 1000 t -> width
        self.text_pool = Mlp(c.text_dim, w, w)                               # masked mean of the text -> width
        self.text_proj = Mlp(c.text_dim, w, w)                               # text tokens -> cross-attention keys
        self.null_token = nn.Parameter(torch.zeros(1, 1, w))                 # always a key: fully masked text is fine
        self.blocks = nn.ModuleList(DiTBlock(c) for _ in range(c.depth))
        self.final = FinalLayer(c)
        # Recompute each block's activations in backward instead of keeping them (set from outside, e.g. by the
        # train stage). Done here rather than with a wrapper module so parameter names, and so checkpoints and
        # the EMA, are the same with and without it.
        self.recompute_blocks = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's: xavier-uniform linears with zero bias, the patch embedding like a linear, N(0, 0.02) timestep MLP;
        every adaLN modulation, the cross-attention outputs and the final linear at zero, so the untrained model is
        a stack of identity blocks that outputs exactly zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.config.width, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for linear in (self.t_embed.fc1, self.t_embed.fc2):
            nn.init.normal_(linear.weight, std=INIT_STD)
        nn.init.normal_(self.null_token, std=INIT_STD)
        zero = [block.modulation[-1] for block in self.blocks] + [block.cross.proj for block in self.blocks]
        for linear in zero + [self.final.modulation[-1], self.final.linear]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    # ------------------------------------------------------------------------------------------------ for outside

    def num_params(self) -> int:
        """Number of parameters (works on the meta device)."""
        return sum(p.numel() for p in self.parameters())

    def num_tokens(self, frames: int, height: int, width: int) -> int:
        """Tokens of an input with `frames` frames of height x width (pixels or latent cells, at any stage)."""
        p = self.config.patch_size
        return frames * (height // p) * (width // p)

    def sharding_units(self) -> list[nn.Module]:
        """The FSDP2 units (also what recompute_blocks recomputes): the blocks; the root keeps embeddings and head."""
        return list(self.blocks)

    def temporal_attention_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """(qualified name, module) of every block's temporal attention, first block first."""
        for i, block in enumerate(self.blocks):
            yield f"blocks.{i}.temporal", block.temporal

    def replace_temporal_attention(self, make: Callable[[str, nn.Module], nn.Module]) -> None:
        """Install make(name, current module) as every block's temporal attention. The replacement is called as
        module(h) with h (B * h * w, T, C), rows in (b, y, x) order, frames in time order, and must return the
        attention output of the same shape (the block adds gate and residual)."""
        for i, block in enumerate(self.blocks):
            block.temporal = make(f"blocks.{i}.temporal", block.temporal)

    # ------------------------------------------------------------------------------------------------ checks

    def _check_inputs(self, x, t, text, text_mask, spatial_factor) -> None:
        c = self.config
        layout = "(B, 3, K, H, W) pixels" if c.kind == "keyframe" else "(B, C_z, K*T', h, w) latents"
        check_shape(x, 5, f"DiT ({c.kind}) input x", layout, c.in_channels)
        B, _, T, H, W = x.shape
        if H < c.patch_size or W < c.patch_size or H % c.patch_size or W % c.patch_size:
            raise ValueError(f"DiT: x of shape {tuple(x.shape)} needs H and W divisible by patch_size="
                             f"{c.patch_size}")
        if c.kind == "motion" and T % c.frames_per_clip:
            raise ValueError(f"DiT (motion): x of shape {tuple(x.shape)} needs T = K * frames_per_clip, a multiple "
                             f"of {c.frames_per_clip}")
        if not isinstance(spatial_factor, int) or spatial_factor < 1 or spatial_factor & (spatial_factor - 1):
            raise ValueError(f"DiT: spatial_factor must be a power of two (1, 2, 4, ...), got {spatial_factor!r}")
        if t.shape != (B,) or not t.is_floating_point():
            raise ValueError(f"DiT: t must be a float tensor of shape (B,) = {(B,)}, got {t.dtype} shape "
                             f"{tuple(t.shape)}")
        check_shape(text, 3, "DiT text states", "(B, L, D_text)", c.text_dim, dim=2)
        if text.shape[0] != B or text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool:
            raise ValueError(f"DiT: text {tuple(text.shape)} and text_mask (bool {tuple(text.shape[:2])}) must "
                             f"match x's batch {B}; got text_mask {text_mask.dtype} shape {tuple(text_mask.shape)}")

    def _check_cond(self, cond: Optional[MotionCond], x: torch.Tensor, factor: int) -> None:
        c = self.config
        if c.kind == "keyframe":
            if cond is not None:
                raise ValueError("DiT (keyframe): takes no cond; pass cond=None")
            return
        if not isinstance(cond, MotionCond):
            raise ValueError(f"DiT (motion): cond must be a MotionCond, got {type(cond).__name__}")
        B, _, T, h, w = x.shape
        s = c.content_scale * factor
        want = (B, RGB, T // c.frames_per_clip, h * s, w * s)
        if tuple(cond.frames.shape) != want:
            raise ValueError(f"DiT (motion): cond.frames must be the full-resolution content frames (B, 3, K, H, W) "
                             f"= {want} for x of shape {tuple(x.shape)} at spatial_factor {factor}; got shape "
                             f"{tuple(cond.frames.shape)}")
        if cond.next_frame is not None and tuple(cond.next_frame.shape) != (B, RGB, *want[-2:]):
            raise ValueError(f"DiT (motion): cond.next_frame must be (B, 3, H, W) = {(B, RGB, *want[-2:])}, got "
                             f"shape {tuple(cond.next_frame.shape)}")
        if cond.has_next is not None and (cond.has_next.shape != (B,) or cond.has_next.dtype != torch.bool
                                          or cond.next_frame is None):
            raise ValueError(f"DiT (motion): cond.has_next must be bool (B,) = {(B,)} next to a next_frame, got "
                             f"{cond.has_next.dtype} shape {tuple(cond.has_next.shape)}")

    # ------------------------------------------------------------------------------------------------ forward

    def condition_channels(self, cond: MotionCond, x: torch.Tensor, factor: int) -> torch.Tensor:
        """Motion conditioning on x's grid: (B, 2 C_c + 1, K T', h, w) = [own content | next content | next flag],
        each clip's features repeated over its T' latent frames. A missing next clip gives zeros and flag 0."""
        B, _, T, h, w = x.shape
        K, Tc, cc = T // self.config.frames_per_clip, self.config.frames_per_clip, self.config.content_channels
        frames = cond.frames.to(x.dtype).transpose(1, 2).reshape(B * K, RGB, *cond.frames.shape[-2:])  # (B K, 3, H, W)
        if cond.next_frame is not None:
            frames = torch.cat([frames.view(B, K, RGB, *frames.shape[-2:]),
                                cond.next_frame.to(x.dtype)[:, None]], dim=1).flatten(0, 1)   # (B (K+1), 3, H, W)
        feats = self.content_stem(frames, factor).view(B, -1, cc, h, w)     # (B, K or K+1, C_c, h, w)
        own = feats[:, :K]                                                  # (B, K, C_c, h, w)
        has = torch.zeros(B, dtype=torch.bool, device=x.device) if cond.next_frame is None else (
            torch.ones(B, dtype=torch.bool, device=x.device) if cond.has_next is None else cond.has_next)
        last = feats[:, K] if cond.next_frame is not None else torch.zeros_like(own[:, 0])   # (B, C_c, h, w)
        last = last * has.to(x.dtype)[:, None, None, None]                  # (B, C_c, h, w): zeros without a next
        nxt = torch.cat([own[:, 1:], last[:, None]], dim=1)                 # (B, K, C_c, h, w)
        flag = torch.ones(B, K, 1, h, w, dtype=x.dtype, device=x.device)
        flag[:, -1] = has.to(x.dtype)[:, None, None, None]                  # (B, K, 1, h, w)
        per_clip = torch.cat([own, nxt, flag], dim=2)                       # (B, K, 2 C_c + 1, h, w)
        return per_clip.transpose(1, 2).repeat_interleave(Tc, dim=2)        # (B, 2 C_c + 1, K T', h, w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                cond: Optional[MotionCond] = None, spatial_factor: int = 1) -> torch.Tensor:
        """x (B, C, T, H, W) noisy input at pyramid factor `spatial_factor`, t (B,) in [0, 1], text (B, L, D_text),
        text_mask (B, L) bool (True = a real token; all False = no text, for classifier-free guidance),
        cond a MotionCond for motion models -> velocity (B, C, T, H, W)."""
        self._check_inputs(x, t, text, text_mask, spatial_factor)
        self._check_cond(cond, x, spatial_factor)
        B, C, T, H, W = x.shape
        p, w = self.config.patch_size, self.config.width
        h_tok, w_tok = H // p, W // p
        inp = x if cond is None else torch.cat([x, self.condition_channels(cond, x, spatial_factor)], dim=1)
        tokens = self.patch_embed(inp)                                         # (B, width, T, h', w')
        tokens = tokens.flatten(3).permute(0, 2, 3, 1)                         # (B, T, S, width), S = h' w'
        pos = pos_embed(T, h_tok, w_tok, w, spatial_factor, x.device)          # (T S, width)
        tokens = tokens + pos.to(tokens.dtype).view(T, h_tok * w_tok, w)       # (B, T, S, width)

        text = text.to(x.dtype).masked_fill(~text_mask[..., None], 0.0)        # (B, L, D): masked tokens are inert
        count = text_mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)    # (B, 1)
        pooled = text.sum(dim=1) / count                                       # (B, D): 0 for an empty text
        t_freq = sinusoidal_embedding(t.float() * TIME_SCALE, TIME_FREQ_DIM)   # (B, 256) in float32
        c = self.t_embed(t_freq.to(x.dtype)) + self.text_pool(pooled)          # (B, width)
        context = torch.cat([self.null_token.to(x.dtype).expand(B, 1, w), self.text_proj(text)], dim=1)  # (B, 1+L, w)
        context_mask = F.pad(text_mask, (1, 0), value=True)                    # (B, 1+L): the null key is always on

        recompute = self.recompute_blocks and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                tokens = checkpoint(block, tokens, c, context, context_mask, use_reentrant=False)
            else:
                tokens = block(tokens, c, context, context_mask)               # (B, T, S, width)
        out = self.final(tokens, c)                                            # (B, T, S, p p C)
        out = out.view(B, T, h_tok, w_tok, p * p * C)                          # (B, T, h', w', p p C)
        return unpatchify_frames(out, p, C)                                    # (B, C, T, H, W)

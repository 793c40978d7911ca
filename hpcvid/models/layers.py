"""Layers shared by the video autoencoders (Reducio-VAE, CMD) and the video DiT.

Conventions: feature maps are channels-first as torch's convolutions expect, (B, C, H, W) or (B, C, T, H, W);
token sequences are (B, N, C). Every input check raises ValueError naming the shape it got, never `assert`
(python -O strips those). Imports torch only.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

MAX_GROUPS = 32          # GroupNorm groups, as in the latent-diffusion autoencoders; fewer when C is not divisible
NORM_EPS = 1e-6
HEAD_DIM = 64            # attention head width throughout (METHODS.md §1: "head dim 64")
MAX_PERIOD = 10_000.0    # longest wavelength of the sinusoidal embeddings (Transformer convention)


# ---------------------------------------------------------------------------------------------------- checks, norm

def check_shape(x: torch.Tensor, ndim: int, name: str, layout: str, channels: Optional[int] = None,
                dim: int = 1) -> None:
    """Raise ValueError unless x has `ndim` dims (and `channels` at `dim`); the message shows the shape it got."""
    if x.ndim != ndim or (channels is not None and x.shape[dim] != channels):
        want = f"{layout}" + (f" with {channels} at dim {dim}" if channels is not None else "")
        raise ValueError(f"{name}: expected a {ndim}-dim tensor {want}, got shape {tuple(x.shape)}")


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the most groups (<= 32) that divide `channels`, so any width works."""
    groups = max(g for g in range(1, min(MAX_GROUPS, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


# ---------------------------------------------------------------------------------------------------- ResNet blocks

class _ResnetBlock(nn.Module):
    """norm -> SiLU -> conv -> norm -> SiLU -> dropout -> conv, plus a (1x1 conv when C changes) shortcut."""
    conv_cls: type = nn.Conv2d
    spatial_dims = 2

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = norm(in_channels)
        self.conv1 = self.conv_cls(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = self.conv_cls(out_channels, out_channels, 3, padding=1)
        self.shortcut = self.conv_cls(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_shape(x, self.spatial_dims + 2, type(self).__name__, "(B, C, *spatial)", self.in_channels)
        h = self.conv1(F.silu(self.norm1(x)))                       # (B, C_out, *S)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))         # (B, C_out, *S)
        return self.shortcut(x) + h                                 # (B, C_out, *S)


class ResnetBlock2d(_ResnetBlock):
    conv_cls, spatial_dims = nn.Conv2d, 2


class ResnetBlock3d(_ResnetBlock):
    conv_cls, spatial_dims = nn.Conv3d, 3


# ---------------------------------------------------------------------------------------------------- resampling

def _check_factor(name: str, value: int) -> int:
    if value not in (1, 2):
        raise ValueError(f"{name}: resampling factors must be 1 or 2, got {value}")
    return value


class Downsample3d(nn.Module):
    """Strided 3x3x3 conv: (B, C, T, H, W) -> (B, C_out, T/temporal, H/spatial, W/spatial)."""

    def __init__(self, channels: int, spatial: int = 2, temporal: int = 1, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.factors = (_check_factor("temporal", temporal), _check_factor("spatial", spatial),
                        _check_factor("spatial", spatial))
        self.conv = nn.Conv3d(channels, out_channels or channels, 3, stride=self.factors, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_shape(x, 5, "Downsample3d", "(B, C, T, H, W)", self.channels)
        if any(s % f for s, f in zip(x.shape[2:], self.factors)):
            raise ValueError(f"Downsample3d: (T, H, W) of shape {tuple(x.shape)} must be divisible by {self.factors}")
        return self.conv(x)                                         # (B, C_out, T/ft, H/fs, W/fs)


class Upsample3d(nn.Module):
    """Nearest-neighbour upsampling then a 3x3x3 conv: (B, C, T, H, W) -> (B, C_out, T*temporal, H*s, W*s)."""

    def __init__(self, channels: int, spatial: int = 2, temporal: int = 1, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.factors = (_check_factor("temporal", temporal), _check_factor("spatial", spatial),
                        _check_factor("spatial", spatial))
        self.conv = nn.Conv3d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_shape(x, 5, "Upsample3d", "(B, C, T, H, W)", self.channels)
        x = F.interpolate(x, scale_factor=self.factors, mode="nearest")  # (B, C, T*ft, H*fs, W*fs)
        return self.conv(x)                                              # (B, C_out, T*ft, H*fs, W*fs)


class Downsample2d(nn.Module):
    """Strided 3x3 conv: (B, C, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_shape(x, 4, "Downsample2d", "(B, C, H, W)", self.channels)
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(f"Downsample2d: H and W of shape {tuple(x.shape)} must be even")
        return self.conv(x)                                         # (B, C_out, H/2, W/2)


# ---------------------------------------------------------------------------------------------------- attention

class Attention(nn.Module):
    """Multi-head attention over token sequences; self-attention without `context`, cross-attention with it.

    heads defaults to dim // head_dim (at least 1). key_padding_mask (B, M) is True for keys to attend to;
    every query row needs at least one True key.
    """

    def __init__(self, dim: int, context_dim: Optional[int] = None, heads: Optional[int] = None,
                 head_dim: int = HEAD_DIM, bias: bool = True):
        super().__init__()
        self.dim, self.context_dim = dim, context_dim or dim
        self.heads = heads or max(1, dim // head_dim)
        self.head_dim = head_dim
        inner = self.heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_kv = nn.Linear(self.context_dim, 2 * inner, bias=bias)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_shape(x, 3, "Attention queries", "(B, N, C)", self.dim, dim=2)
        ctx = x if context is None else context
        check_shape(ctx, 3, "Attention context", "(B, M, C_ctx)", self.context_dim, dim=2)
        (B, N, _), M, h, d = x.shape, ctx.shape[1], self.heads, self.head_dim
        if ctx.shape[0] != B:
            raise ValueError(f"Attention: context of shape {tuple(ctx.shape)} has another batch size than the "
                             f"queries {tuple(x.shape)}")
        mask = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, M) or key_padding_mask.dtype != torch.bool:
                raise ValueError(f"Attention: key_padding_mask must be bool (B, M) = {(B, M)}, got "
                                 f"{key_padding_mask.dtype} shape {tuple(key_padding_mask.shape)}")
            mask = key_padding_mask[:, None, None, :]                        # (B, 1, 1, M)
        q = self.to_q(x).view(B, N, h, d).transpose(1, 2)                    # (B, h, N, d)
        k, v = self.to_kv(ctx).view(B, M, 2, h, d).permute(2, 0, 3, 1, 4)   # 2 x (B, h, M, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)       # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, h * d))          # (B, N, C)


class Windows:
    """Non-overlapping (t, h, w) windows over a (T, H, W) grid; the grid is zero-padded at its far ends.

    A window dimension larger than the grid shrinks to the grid, so small maps get full attention. Every window
    starts inside the grid, so it always holds at least one real token for the key mask.
    """

    def __init__(self, size: Sequence[int], window: Sequence[int]):
        if len(size) != 3 or len(window) != 3 or min(window) < 1:
            raise ValueError(f"Windows: need 3 sizes and 3 positive window sizes, got {tuple(size)}, {tuple(window)}")
        self.size = tuple(int(s) for s in size)
        self.window = tuple(min(int(w), s) for w, s in zip(window, self.size))
        self.counts = tuple(-(-s // w) for s, w in zip(self.size, self.window))
        self.padded = tuple(n * w for n, w in zip(self.counts, self.window))

    @property
    def num(self) -> int:
        return math.prod(self.counts)

    @property
    def tokens(self) -> int:
        return math.prod(self.window)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, C) -> (B * num, t*h*w, C)."""
        B, C = x.shape[0], x.shape[-1]
        pads = [p - s for p, s in zip(self.padded, self.size)]
        if any(pads):
            x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))         # (B, Tp, Hp, Wp, C)
        (nt, nh, nw), (wt, wh, ww) = self.counts, self.window
        x = x.view(B, nt, wt, nh, wh, nw, ww, C).permute(0, 1, 3, 5, 2, 4, 6, 7)  # (B, nt, nh, nw, wt, wh, ww, C)
        return x.reshape(B * self.num, self.tokens, C)                       # (B * num, t*h*w, C)

    def merge(self, tokens: torch.Tensor, batch: int) -> torch.Tensor:
        """(B * num, t*h*w, C) -> (B, T, H, W, C), padding cropped."""
        (nt, nh, nw), (wt, wh, ww), C = self.counts, self.window, tokens.shape[-1]
        x = tokens.view(batch, nt, nh, nw, wt, wh, ww, C).permute(0, 1, 4, 2, 5, 3, 6, 7)  # (B, nt, wt, nh, ...)
        x = x.reshape(batch, *self.padded, C)                                # (B, Tp, Hp, Wp, C)
        T, H, W = self.size
        return x[:, :T, :H, :W]                                             # (B, T, H, W, C)

    def key_mask(self, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        """(B * num, t*h*w) bool, True on real tokens; None when nothing is padded."""
        if self.padded == self.size:
            return None
        ones = torch.ones(1, *self.size, 1, device=device)
        return self.split(ones)[..., 0].bool().repeat(batch, 1)             # (B * num, t*h*w)


class WindowSelfAttention3d(nn.Module):
    """Residual multi-head self-attention over (T, H, W) tokens of a feature map, within (t, h, w) windows."""

    def __init__(self, channels: int, window: Sequence[int], head_dim: int = HEAD_DIM):
        super().__init__()
        self.channels, self.window = channels, tuple(window)
        self.norm = norm(channels)
        self.attn = Attention(channels, head_dim=head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_shape(x, 5, "WindowSelfAttention3d", "(B, C, T, H, W)", self.channels)
        B = x.shape[0]
        win = Windows(x.shape[2:], self.window)
        h = self.norm(x).permute(0, 2, 3, 4, 1)                              # (B, T, H, W, C)
        h = self.attn(win.split(h), key_padding_mask=win.key_mask(B, x.device))  # (B * n, t*h*w, C)
        return x + win.merge(h, B).permute(0, 4, 1, 2, 3)                   # (B, C, T, H, W)


class CrossAttentionBlock(nn.Module):
    """x + Attention(LayerNorm(x) + query_pos, LayerNorm(context)): tokens (B, N, C) read a context (B, M, C_ctx)."""

    def __init__(self, dim: int, context_dim: int, head_dim: int = HEAD_DIM):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=NORM_EPS)
        self.norm_ctx = nn.LayerNorm(context_dim, eps=NORM_EPS)
        self.attn = Attention(dim, context_dim, head_dim=head_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, query_pos: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q = self.norm_q(x) if query_pos is None else self.norm_q(x) + query_pos   # (B, N, C)
        return x + self.attn(q, self.norm_ctx(context), key_padding_mask)         # (B, N, C)


# ---------------------------------------------------------------------------------------------------- embeddings, MLP

def sinusoidal_embedding(positions: torch.Tensor, dim: int, max_period: float = MAX_PERIOD) -> torch.Tensor:
    """positions (N,) (any real values) -> (N, dim) float32: [cos(p w_i), sin(p w_i)], w_i = max_period^(-i/half)."""
    check_shape(positions, 1, "sinusoidal_embedding positions", "(N,)")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=positions.device) / max(half, 1))  # (half,)
    args = positions.float()[:, None] * freqs[None]                          # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)             # (N, 2*half)
    return F.pad(emb, (0, dim % 2))                                          # (N, dim): odd dim gets a zero column


def pos_embed_3d_dims(dim: int) -> tuple[int, int, int]:
    """How pos_embed_3d splits `dim` between t, h and w (h and w equal, t takes the rest)."""
    spatial = dim // 3
    return dim - 2 * spatial, spatial, spatial


def pos_embed_3d(frames: int, height: int, width: int, dim: int,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """Fixed sin-cos position embedding of a (T, H, W) grid: (T*H*W, dim) in t-major order, [emb_t | emb_h | emb_w]."""
    dt, dh, dw = pos_embed_3d_dims(dim)
    t, h, w = (torch.arange(n, device=device) for n in (frames, height, width))
    et = sinusoidal_embedding(t, dt)[:, None, None].expand(frames, height, width, dt)   # (T, H, W, dt)
    eh = sinusoidal_embedding(h, dh)[None, :, None].expand(frames, height, width, dh)   # (T, H, W, dh)
    ew = sinusoidal_embedding(w, dw)[None, None, :].expand(frames, height, width, dw)   # (T, H, W, dw)
    return torch.cat([et, eh, ew], dim=-1).reshape(frames * height * width, dim)       # (T*H*W, dim)


class Mlp(nn.Module):
    """Linear -> GELU (tanh) -> Linear, over the last dim."""

    def __init__(self, dim: int, hidden_dim: Optional[int] = None, out_dim: Optional[int] = None,
                 mlp_ratio: float = 4.0):
        super().__init__()
        hidden_dim = hidden_dim or int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))            # (..., dim) -> (..., out_dim)

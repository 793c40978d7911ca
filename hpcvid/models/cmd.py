"""CMD autoencoder: a video as one content frame plus a small motion latent (METHODS.md §2).

The encoder is a video transformer with factorised attention (each block: spatial attention within every frame,
temporal attention at every spatial position, MLP) over patch tokens u (B, L, H', W', C). From u it makes
  - the content frame x_bar = sum_l x_l * softmax_l(f(u)): a per-pixel, per-channel weighted average of the frames;
  - the motion latent: u averaged over the x axis -> z_x (B, D, L, H'), over the y axis -> z_y (B, D, L, W'),
    each through a linear map to D channels and tanh.
The decoder patch-embeds x_bar, maps z_x and z_y back to the width, broadcast-adds the three into the L x H' x W'
token grid, runs a transformer of the same shape and un-patches to the video.

    model = CMDAutoencoder(CMD_PRESETS["tiny"])
    content, z_x, z_y = model.encode(video)         # (B, 3, H, W), (B, D, L, H'), (B, D, L, W'); video in [-1, 1]
    recon = model.decode(content, z_x, z_y)         # (B, 3, L, H, W)

Losses live outside (hpcvid.train); this file imports torch only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from hpcvid.models.layers import NORM_EPS, Attention, Mlp, check_shape, pos_embed_3d


# ---------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class CMDConfig:
    """Sizes of a CMD autoencoder. depth counts the blocks of the encoder and again of the decoder; frames and
    image_size are the training clip, the defaults of latent_shapes (the model itself takes any size that the
    patch size divides)."""
    in_channels: int = 3
    patch_size: int = 2
    width: int = 384
    depth: int = 8
    heads: int = 6
    motion_channels: int = 8            # D
    frames: int = 16
    image_size: tuple[int, int] = (256, 256)
    mlp_ratio: float = 4.0
    # ours, not the paper's: the decoder's output is added to the content frame x_bar (repeated over time) and its
    # last layer starts at zero, so the first decode is x_bar itself and training learns the motion on top. False
    # keeps checkpoints of hpcvid 0.1 loading as they were.
    content_residual: bool = False

    def __post_init__(self):
        for key in ("in_channels", "patch_size", "width", "depth", "heads", "motion_channels", "frames"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CMDConfig.{key} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"CMDConfig.width={self.width} must be divisible by heads={self.heads}")
        if len(self.image_size) != 2 or any(s < 1 or s % self.patch_size for s in self.image_size):
            raise ValueError(f"CMDConfig.image_size={self.image_size!r} must be (H, W) divisible by "
                             f"patch_size={self.patch_size}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"CMDConfig.mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def patch_dim(self) -> int:
        """Values per patch: p * p * C."""
        return self.patch_size ** 2 * self.in_channels


CMD_PRESETS = {
    # METHODS.md §2: patch 2, width 384, depth 8, D 8 (the paper's ablation prefers D 16: a config value); plus
    # the content residual (see CMDConfig.content_residual)
    "paper": CMDConfig(content_residual=True),
    # CPU training on 16x64x64 clips: 8x8 tokens per frame, z_x and z_y 8 x 16 x 8 (patch 4 costs ~4x the time)
    "tiny": CMDConfig(patch_size=8, width=128, depth=2, heads=2, motion_channels=8, frames=16, image_size=(64, 64),
                      content_residual=True),
}


# ---------------------------------------------------------------------------------------------------- blocks

def patchify_frames(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, L, H, W) -> (B, L, H/p, W/p, p*p*C), patch values in (dy, dx, c) order."""
    B, C, L, H, W = x.shape
    x = x.view(B, C, L, H // p, p, W // p, p).permute(0, 2, 3, 5, 4, 6, 1)  # (B, L, H', W', p, p, C)
    return x.reshape(B, L, H // p, W // p, p * p * C)


def unpatchify_frames(x: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """(B, L, H', W', p*p*C) -> (B, C, L, H' p, W' p), the inverse of patchify_frames."""
    B, L, Hp, Wp, _ = x.shape
    x = x.view(B, L, Hp, Wp, p, p, channels).permute(0, 6, 1, 2, 4, 3, 5)   # (B, C, L, H', p, W', p)
    return x.reshape(B, channels, L, Hp * p, Wp * p)


class FactorisedBlock(nn.Module):
    """Spatial attention within each frame, temporal attention at each position, then an MLP; all pre-norm."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_s = nn.LayerNorm(width, eps=NORM_EPS)
        self.spatial = Attention(width, heads=heads, head_dim=width // heads)
        self.norm_t = nn.LayerNorm(width, eps=NORM_EPS)
        self.temporal = Attention(width, heads=heads, head_dim=width // heads)
        self.norm_mlp = nn.LayerNorm(width, eps=NORM_EPS)
        self.mlp = Mlp(width, mlp_ratio=mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, Hp, Wp, C = x.shape
        s = x.reshape(B * L, Hp * Wp, C)                               # (B L, H' W', C): one frame per row
        s = s + self.spatial(self.norm_s(s))                           # (B L, H' W', C)
        t = s.view(B, L, Hp * Wp, C).transpose(1, 2).reshape(B * Hp * Wp, L, C)  # (B H' W', L, C): one position
        t = t + self.temporal(self.norm_t(t))                          # (B H' W', L, C)
        x = t.view(B, Hp, Wp, L, C).permute(0, 3, 1, 2, 4)            # (B, L, H', W', C)
        return x + self.mlp(self.norm_mlp(x))                          # (B, L, H', W', C)


class Transformer(nn.Module):
    """`depth` factorised blocks over (B, L, H', W', C) tokens with a fixed 3D sin-cos position embedding."""

    def __init__(self, config: CMDConfig):
        super().__init__()
        self.blocks = nn.ModuleList(FactorisedBlock(config.width, config.heads, config.mlp_ratio)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, Hp, Wp, C = x.shape
        x = x + pos_embed_3d(L, Hp, Wp, C, x.device).to(x.dtype).view(L, Hp, Wp, C)  # (B, L, H', W', C)
        for block in self.blocks:
            x = block(x)                                               # (B, L, H', W', C)
        return self.norm(x)                                            # (B, L, H', W', C)


# ---------------------------------------------------------------------------------------------------- autoencoder

class CMDAutoencoder(nn.Module):
    def __init__(self, config: CMDConfig):
        super().__init__()
        self.config = config
        c, w, d = config, config.width, config.motion_channels
        # encoder
        self.embed = nn.Linear(c.patch_dim, w)                         # patch embedding of every frame
        self.encoder = Transformer(c)
        self.content_head = nn.Linear(w, c.patch_dim)                  # f: per-pixel, per-channel frame logits
        self.to_z_x = nn.Linear(w, d)                                  # the 1x1 projections to D channels
        self.to_z_y = nn.Linear(w, d)
        # decoder
        self.content_embed = nn.Linear(c.patch_dim, w)
        self.from_z_x = nn.Linear(d, w)
        self.from_z_y = nn.Linear(d, w)
        self.decoder = Transformer(c)
        self.out = nn.Linear(w, c.patch_dim)
        if c.content_residual:          # the first decode is the content frame itself
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def latent_shapes(self, num_frames: Optional[int] = None, height: Optional[int] = None,
                      width: Optional[int] = None) -> dict[str, tuple[int, ...]]:
        """Shapes (without batch) of content (C, H, W), z_x (D, L, H') and z_y (D, L, W'); defaults: the config's."""
        c = self.config
        L = c.frames if num_frames is None else num_frames
        H = c.image_size[0] if height is None else height
        W = c.image_size[1] if width is None else width
        if L < 1 or H < 1 or W < 1 or H % c.patch_size or W % c.patch_size:
            raise ValueError(f"CMD: clip (L, H, W) = {(L, H, W)} must have H and W divisible by "
                             f"patch_size={c.patch_size}")
        p = c.patch_size
        return {"content": (c.in_channels, H, W), "z_x": (c.motion_channels, L, H // p),
                "z_y": (c.motion_channels, L, W // p)}

    def _check_video(self, video: torch.Tensor) -> None:
        check_shape(video, 5, "CMD video", "(B, C, L, H, W)", self.config.in_channels)
        try:
            self.latent_shapes(*video.shape[2:])
        except ValueError as err:
            raise ValueError(f"{err}; got video of shape {tuple(video.shape)}") from None

    def _encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video (B, C, L, H, W) -> tokens u (B, L, H', W', width), content weights (B, C, L, H, W)."""
        self._check_video(video)
        p, C = self.config.patch_size, self.config.in_channels
        u = self.encoder(self.embed(patchify_frames(video, p)))       # (B, L, H', W', width)
        logits = unpatchify_frames(self.content_head(u), p, C)        # (B, C, L, H, W)
        return u, logits.softmax(dim=2)                                # weights sum to 1 over L

    def content_weights(self, video: torch.Tensor) -> torch.Tensor:
        """softmax_l(f(u)): (B, C, L, H, W), per pixel and channel, summing to 1 over the L frames."""
        return self._encode(video)[1]

    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """video (B, C, L, H, W) in [-1, 1] -> content (B, C, H, W), z_x (B, D, L, H'), z_y (B, D, L, W')."""
        u, weights = self._encode(video)                               # (B, L, H', W', width), (B, C, L, H, W)
        content = (video * weights).sum(dim=2)                         # (B, C, H, W)
        z_x = torch.tanh(self.to_z_x(u.mean(dim=3))).permute(0, 3, 1, 2)   # mean over x: (B, D, L, H')
        z_y = torch.tanh(self.to_z_y(u.mean(dim=2))).permute(0, 3, 1, 2)   # mean over y: (B, D, L, W')
        return content, z_x, z_y

    def decode(self, content: torch.Tensor, z_x: torch.Tensor, z_y: torch.Tensor) -> torch.Tensor:
        """content (B, C, H, W), z_x (B, D, L, H'), z_y (B, D, L, W') -> video (B, C, L, H, W)."""
        c = self.config
        check_shape(content, 4, "CMD content", "(B, C, H, W)", c.in_channels)
        check_shape(z_x, 4, "CMD z_x", "(B, D, L, H')", c.motion_channels)
        check_shape(z_y, 4, "CMD z_y", "(B, D, L, W')", c.motion_channels)
        B, _, H, W = content.shape
        want = {"content": (c.in_channels, H, W), "z_x": (c.motion_channels, z_x.shape[2], H // c.patch_size),
                "z_y": (c.motion_channels, z_x.shape[2], W // c.patch_size)}
        got = {"content": tuple(content.shape[1:]), "z_x": tuple(z_x.shape[1:]), "z_y": tuple(z_y.shape[1:])}
        if H % c.patch_size or W % c.patch_size or got != want or z_x.shape[0] != B or z_y.shape[0] != B:
            raise ValueError(f"CMD decode: shapes do not fit together: content {tuple(content.shape)}, z_x "
                             f"{tuple(z_x.shape)}, z_y {tuple(z_y.shape)} (want per sample {want}, "
                             f"H and W divisible by {c.patch_size})")
        frame = self.content_embed(patchify_frames(content[:, :, None], c.patch_size))  # (B, 1, H', W', width)
        mx = self.from_z_x(z_x.permute(0, 2, 3, 1))                   # (B, L, H', width)
        my = self.from_z_y(z_y.permute(0, 2, 3, 1))                   # (B, L, W', width)
        h = frame + mx[:, :, :, None] + my[:, :, None]                 # (B, L, H', W', width)
        h = self.out(self.decoder(h))                                  # (B, L, H', W', p*p*C)
        video = unpatchify_frames(h, c.patch_size, c.in_channels)      # (B, C, L, H, W)
        return video + content[:, :, None] if c.content_residual else video

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        content, z_x, z_y = self.encode(video)                         # (B, C, H, W), (B, D, L, H'), (B, D, L, W')
        recon = self.decode(content, z_x, z_y)                         # (B, C, L, H, W)
        return {"recon": recon, "content": content, "z_x": z_x, "z_y": z_y}

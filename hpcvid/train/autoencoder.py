"""The two video autoencoders behind one small interface, for training, evaluation and prep.

    cfg = model_config("reducio", "tiny", {})          # a preset with overrides, checked
    model = build_model("reducio", cfg)
    check_clip_size("reducio", cfg, 16, 64, 64)        # UserError naming the factors when the size does not fit
    recon, kl = train_pass("reducio", model, video, generator)   # kl (B,) or None (CMD has no posterior)
    recon = reconstruct("reducio", model, video)       # deterministic (posterior mean)
    compression("reducio", cfg, 16, 64, 64)            # latent and side-information sizes per clip

The models stay plain nn.Modules (hpcvid.models); what differs between them (the KL, the content input, which layer
the GAN weight reads) is answered here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from hpcvid.config import UserError
from hpcvid.models.cmd import CMD_PRESETS, CMDAutoencoder, CMDConfig
from hpcvid.models.reducio import REDUCIO_PRESETS, ReducioConfig, ReducioVAE
from hpcvid.train import checkpoint as ck
from hpcvid.train.losses import kl_per_clip

FAMILIES = {
    "reducio": (ReducioConfig, REDUCIO_PRESETS, ReducioVAE),
    "cmd": (CMDConfig, CMD_PRESETS, CMDAutoencoder),
}
LATENT_STORE_BYTES = 2        # latents are stored as float16 in prep shards


def _family(kind: str):
    if kind not in FAMILIES:
        raise UserError(f"model.kind: {kind!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[kind]


def _as_field(tp: Any, value: Any) -> Any:
    """YAML/JSON lists back into the tuples the frozen model configs hold."""
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def config_from_dict(kind: str, values: dict[str, Any], where: str = "model") -> Any:
    """A model config from plain data (a checkpoint's meta.json, or a preset's fields with overrides)."""
    cls = _family(kind)[0]
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{where}: {unknown[0]!r} is not a {cls.__name__} field; fields: {', '.join(sorted(names))}")
    try:
        return cls(**{k: _as_field(hints[k], v) for k, v in values.items()})
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def model_config(kind: str, preset: str, overrides: Optional[dict[str, Any]] = None) -> Any:
    presets = _family(kind)[1]
    if preset not in presets:
        raise UserError(f"model.preset: {preset!r} is not one of {', '.join(presets)}")
    values = {**config_to_dict(presets[preset]), **(overrides or {})}
    return config_from_dict(kind, values, "model.overrides" if overrides else "model")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: (list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v) for f in dataclasses.fields(cfg)}


def build_model(kind: str, cfg: Any) -> nn.Module:
    return _family(kind)[2](cfg)


def check_clip_size(kind: str, cfg: Any, num_frames: int, height: int, width: int) -> None:
    """Raise a UserError when a num_frames x height x width clip does not fit the model's down-sampling factors."""
    try:
        if kind == "reducio":
            need_t, need_s = cfg.temporal_factor, max(cfg.spatial_factor, cfg.content_factors[-1])
            if num_frames % need_t or height % need_s or width % need_s:
                raise ValueError(f"T must be divisible by {need_t} and H, W by {need_s}")
        else:
            if height % cfg.patch_size or width % cfg.patch_size:
                raise ValueError(f"H, W must be divisible by the patch size {cfg.patch_size}")
    except ValueError as e:
        raise UserError(f"clip {num_frames}x{height}x{width} (T x H x W) does not fit the {kind} model: {e}; "
                        f"change clip.num_frames or the frame size (resolution, or prep buckets)") from None


def train_pass(kind: str, model: nn.Module, video: torch.Tensor,
               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """video (B, 3, T, H, W) in [-1, 1] -> (reconstruction, KL per clip (B,) or None)."""
    if kind == "reducio":
        out = model(video, generator)                               # sampled latent in train mode
        return out["recon"], kl_per_clip(out["mean"], out["logvar"])
    return model(video)["recon"], None


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)                         # DDP keeps the model in .module


def reconstruct(kind: str, model: nn.Module, video: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction: the forward pass in eval mode (Reducio decodes the normalised posterior mean).

    Call with the model in eval mode. A DDP model runs its inner module (no collectives); an FSDP2 model runs
    itself, so every rank must call this together."""
    return _inner(model)(video)["recon"]


def last_layer(kind: str, model: nn.Module) -> torch.Tensor:
    """The weight of the decoder's output layer: where the adaptive GAN weight compares gradients."""
    m = _inner(model)
    return m.decoder.conv_out.weight if kind == "reducio" else m.out.weight


def compression(kind: str, cfg: Any, num_frames: int, height: int, width: int) -> dict[str, Any]:
    """What a clip costs as a latent: elements, the ratio to its pixels, bytes as stored (float16 latents, uint8
    content image), with and without the content image that both decoders need beside the latent."""
    check_clip_size(kind, cfg, num_frames, height, width)
    pixels = 3 * num_frames * height * width
    if kind == "reducio":
        ft, fs = cfg.temporal_factor, cfg.spatial_factor
        shapes = {"latent": [cfg.latent_channels, num_frames // ft, height // fs, width // fs]}
        side = {"content_image": [3, height, width]}
    else:
        p, d = cfg.patch_size, cfg.motion_channels
        shapes = {"z_x": [d, num_frames, height // p], "z_y": [d, num_frames, width // p]}
        side = {"content_frame": [3, height, width]}
    latent = sum(math.prod(s) for s in shapes.values())
    side_elems = sum(math.prod(s) for s in side.values())
    return {
        "clip": [3, num_frames, height, width], "pixel_elements": pixels, "pixel_bytes_uint8": pixels,
        "latent_shapes": shapes, "latent_elements": latent, "latent_over_pixel_elements": latent / pixels,
        "latent_bytes_per_clip": latent * LATENT_STORE_BYTES,
        "side_shapes": side, "side_elements": side_elems,
        "latent_plus_side_bytes_per_clip": latent * LATENT_STORE_BYTES + side_elems,   # side info stored as uint8
        "pixels_per_latent_element": pixels / latent,
    }


def load_autoencoder(path: str | Path, device: torch.device | str = "cpu") -> tuple[str, Any, torch.nn.Module, dict]:
    """(kind, config, model in eval mode, meta) from a checkpoint step folder or a train_ae output folder."""
    folder = ck.resolve_checkpoint(path)
    meta = ck.read_meta(folder)
    kind = meta["model"]["kind"]
    cfg = config_from_dict(kind, meta["model"]["config"], f"{folder / ck.META}: model.config")
    model = build_model(kind, cfg)
    ck.load_into(model, ck.load_weights(folder, "model"), str(folder / "model.safetensors"))
    return kind, cfg, model.to(device).eval(), {**meta, "folder": str(folder)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in _inner(model).parameters())


def compression_table(clips: Optional[dict[str, tuple[int, int, int]]] = None) -> str:
    """Every preset's compression figures on its training clip (tiny: 16x64x64, paper: 16x256x256), as Markdown."""
    clips = clips or {"tiny": (16, 64, 64), "paper": (16, 256, 256)}
    rows = ["| model | clip T x H x W | parameters | latent | latent / pixel elements | latent bytes per clip "
            "(float16) | with the content image (uint8) |", "|---|---|---|---|---|---|---|"]
    for kind in FAMILIES:
        for preset, (T, H, W) in clips.items():
            cfg = model_config(kind, preset)
            with torch.device("meta"):                 # sizes only: no memory, no compute
                n = count_parameters(build_model(kind, cfg))
            c = compression(kind, cfg, T, H, W)
            shapes = " + ".join(f"{k} {'x'.join(map(str, s))}" for k, s in c["latent_shapes"].items())
            rows.append(f"| {kind} {preset} | {T}x{H}x{W} | {n / 1e6:.2f}M | {shapes} = {c['latent_elements']} | "
                        f"{c['latent_over_pixel_elements']:.5f} (1/{c['pixels_per_latent_element']:.0f}) | "
                        f"{c['latent_bytes_per_clip']} | {c['latent_plus_side_bytes_per_clip']} |")
    return "\n".join(rows)


if __name__ == "__main__":     # python -m hpcvid.train.autoencoder: the compression table of docs/autoencoders.md
    print(compression_table())

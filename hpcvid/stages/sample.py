"""The sample stage: one short video from a prompt, end to end, on one process.

    hpcvid sample jobs/tiny_sample.yaml --prompt "a red square moving right"

1. the prompt's token states from the text encoder the DiTs were trained with;
2. the keyframe model samples one content frame per clip, (3, K, H, W) (hpcvid.flow's sampler, with guidance);
3. the motion model samples the clips' motion latents from the text and those frames, (C, K T', h, w);
4. the autoencoder decodes every clip with its own content frame: K clips of T frames, written as sample.mp4;
5. sample.png shows the keyframes over frames of the video; sample.json says what made it.
The models are loaded from the EMA weights of their newest verified checkpoints (ema.safetensors: no pickle).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from hpcvid.config import SampleSpec, UserError
from hpcvid.dist import Comm, Env
from hpcvid.flow import combine_guidance, make_flow, sample
from hpcvid.io import atomic_write_json
from hpcvid.models.dit import DIT_PRESETS, DiT, MotionCond
from hpcvid.train import checkpoint as ck
from hpcvid.train.runtime import config_with, pick_device


@dataclass
class SampleResult:
    output: str
    video: str
    sheet: str
    frames: int
    fps: float
    seconds: float
    summary: str


def load_dit(path: str, kind: str, device: torch.device) -> tuple[DiT, dict[str, Any]]:
    """A trained DiT in eval mode with its EMA weights, and its checkpoint's meta (UserError naming the folder)."""
    folder = ck.resolve_checkpoint(path)
    meta = ck.read_meta(folder)
    model_meta = meta.get("model", {})
    if model_meta.get("kind") != kind or not meta.get("sharded"):
        raise UserError(f"{folder}: sample.{kind}: not a checkpoint of a {kind} DiT (hpcvid train with model.kind: "
                        f"{kind}); it holds {model_meta.get('kind')!r}")
    base = DIT_PRESETS[f"{kind}-{model_meta['preset']}"]
    config = config_with(base, {k: v for k, v in model_meta["config"].items()}, f"{folder / ck.META}: model.config")
    model = DiT(config)
    ck.load_into(model, ck.load_weights(folder, "ema"), str(folder / "ema.safetensors"))
    return model.to(device).eval(), {**meta, "folder": str(folder)}


def load_trained(spec: Any, device: torch.device, section: str) -> tuple:
    """What a sample or render spec names: (keyframe DiT, its meta, motion DiT, its meta, the Reducio config, the
    Reducio-VAE, its meta, the text encoder), checked to fit together (UserError naming `section`'s key)."""
    from hpcvid.stages.encoders import load_text_encoder
    from hpcvid.train.autoencoder import load_autoencoder

    keyframe, kmeta = load_dit(spec.keyframe, "keyframe", device)
    motion, mmeta = load_dit(spec.motion, "motion", device)
    kind, acfg, autoencoder, ameta = load_autoencoder(spec.autoencoder, device)
    if kind != "reducio":
        raise UserError(f"{spec.autoencoder}: {section}.autoencoder: the motion model decodes with a Reducio-VAE, "
                        f"this is {kind!r}")
    encoder = load_text_encoder(spec.text, str(device))
    if encoder is None or encoder.dim != keyframe.config.text_dim:
        raise UserError(f"{section}.text: the DiTs take {keyframe.config.text_dim}-dim token states; text.encoder "
                        f"{spec.text.encoder!r} gives {None if encoder is None else encoder.dim}")
    return keyframe, kmeta, motion, mmeta, acfg, autoencoder, ameta, encoder


def flow_of(meta: dict[str, Any]):
    flow = meta["spec"]["flow"]
    return make_flow(flow["kind"], num_stages=flow["stages"] if flow["kind"] == "pyramidal" else None)


def guided_velocity(model: DiT, text: torch.Tensor, mask: torch.Tensor, guidance: float,
                    cond: Optional[MotionCond] = None, before: Optional[Callable[[torch.Tensor], None]] = None):
    """The guided velocity the sampler integrates: uncond + guidance (cond - uncond). before(t) runs ahead of the
    model calls (clip parallelism reads the step's time there)."""
    empty = torch.zeros_like(mask)

    def velocity(x: torch.Tensor, t: torch.Tensor, factor: int) -> torch.Tensor:
        if before is not None:
            before(t)
        with_text = model(x, t, text, mask, cond, spatial_factor=factor)
        if guidance == 1.0:
            return with_text
        return combine_guidance(with_text, model(x, t, text, empty, cond, spatial_factor=factor), guidance)

    return velocity


def trained_shape(meta: dict[str, Any], what: str) -> list[int]:
    shape = meta.get("sample_shape")
    if not shape:
        raise UserError(f"{meta['folder']}: sample: its meta.json does not record the shape it was trained on "
                        f"({what}); retrain with this hpcvid")
    return list(shape)


@torch.no_grad()
def run(spec: SampleSpec, env: Env, comm: Optional[Comm] = None) -> SampleResult:
    from hpcvid.data.video import write_mp4
    from hpcvid.train.pictures import contact_sheet, write_png

    start = time.time()
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    if not env.is_main:                  # one video: the other ranks of an accidental multi-rank launch idle
        return SampleResult(str(out), "", "", 0, 0.0, 0.0, "")
    device = pick_device(spec.device, env)
    keyframe, kmeta, motion, mmeta, _, autoencoder, ameta, encoder = load_trained(spec, device, "sample")
    states, mask = encoder([spec.prompt])                                   # (1, L, D), (1, L)
    text, mask = states.float().to(device), mask.to(device)
    generator = torch.Generator().manual_seed(spec.seed)

    _, _, H, W = trained_shape(kmeta, "keyframes")                           # (3, K_train, H, W)
    K = spec.clips
    frames = sample(flow_of(kmeta), guided_velocity(keyframe, text, mask, spec.guidance), (1, 3, K, H, W),
                    steps=spec.steps, generator=generator, device=device).clamp(-1, 1)   # (1, 3, K, H, W)
    C, Tk, h, w = trained_shape(mmeta, "motion latents")                      # (C, K_train T', h, w)
    Tp = motion.config.frames_per_clip
    latents = sample(flow_of(mmeta), guided_velocity(motion, text, mask, spec.guidance, MotionCond(frames)),
                     (1, C, K * Tp, h, w), steps=spec.steps, generator=generator, device=device)   # (1, C, K T', h, w)
    clips = []
    for k in range(K):
        z = autoencoder.normalize_latent(latents[:, :, k * Tp:(k + 1) * Tp])   # (1, C, T', h, w)
        clips.append(autoencoder.decode(z, frames[:, :, k]))                  # (1, 3, T, H, W)
    video = torch.cat(clips, dim=2).clamp(-1, 1)                              # (1, 3, K T, H, W)
    uint8 = ((video[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()   # (N, H, W, 3)
    fps = float(ameta.get("spec", {}).get("data", {}).get("clip", {}).get("fps") or 8.0)
    write_mp4(out / "sample.mp4", uint8, fps)
    keys = ((frames[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()  # (K, H, W, 3)
    shown = uint8[np.linspace(0, len(uint8) - 1, K).round().astype(int)]
    write_png(out / "sample.png", contact_sheet([(keys, shown)], frames=K))
    result = SampleResult(str(out), str(out / "sample.mp4"), str(out / "sample.png"), len(uint8), fps,
                          round(time.time() - start, 2), "")
    atomic_write_json(out / "sample.json", {"prompt": spec.prompt, "keyframe": kmeta["folder"], "motion":
                                            mmeta["folder"], "autoencoder": ameta["folder"], "clips": K,
                                            "frames": len(uint8), "fps": fps, "steps": spec.steps,
                                            "guidance": spec.guidance, "seed": spec.seed,
                                            "seconds": result.seconds})
    result.summary = (f"sample: {result.video} ({len(uint8)} frames at {fps:g} fps, {K} clips of {H}x{W}) for "
                      f"{spec.prompt!r} in {result.seconds:.1f} s; keyframes over video frames: {result.sheet}")
    print(result.summary, flush=True)
    return result

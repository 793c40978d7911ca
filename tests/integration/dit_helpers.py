"""Shared by the DiT and render tests: a small real dataset of Reducio latents and tiny DiT training jobs."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from prep_helpers import assert_cli_ok, write_job

from hpcvid.train import checkpoint as ck
from hpcvid.train.autoencoder import build_model, config_to_dict, model_config
from hpcvid.train.checkpoint import full_state


def make_dit_dataset(root: Path, run_cli) -> dict:
    """6 synthetic 64x64 videos of 64 frames -> 4 back-to-back 16-frame clips each, encoded by a random tiny Reducio
    (latents 16x4x8x8, content frames as PNG) with MiniLM captions: 12 sequences of 2 clips."""
    from data_prep.make_synthetic import make_synthetic_videos

    videos = root / "videos"
    made = make_synthetic_videos(videos, [{"name": f"v{i}", "height": 64, "width": 64, "fps": 8, "num_frames": 64}
                                          for i in range(6)], seed=1)
    for path, caption in made:
        path.with_suffix(".txt").write_text(caption + "\n")
    torch.manual_seed(0)
    cfg = model_config("reducio", "tiny")
    weights, _ = full_state(build_model("reducio", cfg))
    ck.save_checkpoint(ck.step_dir(root / "ae", 1), {"model": weights}, {"optimizer": {}},
                       {"step": 1, "model": {"kind": "reducio", "preset": "tiny", "overrides": {},
                                             "config": config_to_dict(cfg)}})
    job = write_job(root / "prep.yaml", {"kind": "folder", "path": str(videos)}, root / "latents",
                    clip={"num_frames": 16, "fps": None, "clips_per_video": 8, "layout": "consecutive"},
                    buckets=[[64, 64]], text={"encoder": "minilm", "max_tokens": 32},
                    encoder={"kind": "reducio", "checkpoint": str(root / "ae")})
    assert_cli_ok(run_cli(["prep", job]))
    return {"root": root, "shards": root / "latents", "ae": root / "ae"}


def train_job(path: Path, dataset: dict, output: Path, kind: str = "keyframe", **changes) -> Path:
    section = {"model": {"kind": kind, "preset": "tiny"}, "data": {"shards": str(dataset["shards"]), "sequence": 2},
               "output": str(output), "flow": {"kind": "pyramidal", "stages": 3, "sample_steps": 2},
               "steps": 6, "batch_size": 2, "lr": 3e-4, "warmup_steps": 2, "ema_decay": 0.9, "checkpoint_every": 2,
               "keep_last": 3, "log_every": 1, "parallel": "none", "progress": False, "torch_threads": 1}
    for key, value in changes.items():
        section[key] = {**section[key], **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump({"train": section}, sort_keys=False))
    return path

"""The train stage: a keyframe or motion DiT trained with (pyramidal) flow matching on a prep dataset, resumable.

Launch (the stage itself does not know which was used):
    hpcvid train jobs/tiny_keyframe.yaml                                    # one process
    mpiexec -n 2 hpcvid train jobs/tiny_motion.yaml                         # 2 ranks, FSDP2 over gloo
    torchrun --nproc-per-node 8 -m hpcvid.cli train jobs/paper_motion.yaml  # one GPU node, FSDP2 over NCCL, bf16
    hpcvid submit PIPELINE.yaml --cluster slurm                             # a pipeline stage (requeued when preempted)

keyframe model: the content frames of `data.sequence` consecutive clips (images/content, uint8) as a (3, K, H, W)
video in [-1, 1]. motion model: their latents, concatenated in time to (C, K T', h, w), conditioned on the same
content frames. Each step draws one flow-matching training pair per sample (hpcvid.flow: the batch split over the
pyramid's stages, text dropped for classifier-free guidance), regresses the velocity with MSE, and updates AdamW
(warm-up + cosine, clipping, accumulation) and an EMA of the weights.

Resume: the newest verified checkpoint in OUTPUT (torch.distributed.checkpoint, any number of ranks) restores model,
optimizer, EMA and the data position; every random draw of step s on rank r is seeded by (seed, s, r), so a resumed
run continues exactly. SIGUSR2/SIGTERM: the step in flight finishes, a checkpoint is saved, the run stops to be
requeued (hpcvid.train.preempt). Non-finite steps are skipped on every rank alike and stop the run after
`max_nonfinite_steps` in a row (exit 3). Rank 0 writes metrics.jsonl and tensorboard/ (hpcvid.train.metrics.
TrainingLog), loss_curves.png, samples.png (keyframe models) and train_report.json.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import hpcvid
from hpcvid.config import RunStopped, TrainSpec, UserError, to_dict
from hpcvid.data.dataset import ShardDataset
from hpcvid.dist import Comm, Env, make_comm
from hpcvid.flow import combine_guidance, make_flow, sample, text_dropout_mask
from hpcvid.io import atomic_write_json, read_json
from hpcvid.models.dit import DIT_PRESETS, DiT, MotionCond
from hpcvid.parallel.fsdp import parallelize
from hpcvid.train import checkpoint as ck
from hpcvid.train.ema import EMA
from hpcvid.train.loop import TrainLoop
from hpcvid.train.metrics import TrainingLog, read_jsonl
from hpcvid.train.runtime import config_with, matmul_tflops, step_seed, training_process, warmup_cosine
from hpcvid.train.sharded import load_sharded, save_sharded


@dataclass
class TrainResult:
    output: str
    kind: str
    preset: str
    world_size: int
    start_step: int                     # > 0 when this run resumed from a checkpoint
    steps: int
    seconds: float
    seconds_per_step: Optional[float]   # median over this run's steps
    final_loss: Optional[float]         # mean over the last logged interval and the ranks
    skipped_steps: int
    checkpoint: str
    tokens_per_step: int                # over all ranks, one optimizer step
    mfu: Optional[float]                # model FLOPs utilisation against the peak (see the summary for which)
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- set-up

def build_model(spec: TrainSpec) -> DiT:
    key = f"{spec.model.kind}-{spec.model.preset}"
    config = config_with(DIT_PRESETS[key], spec.model.overrides, "train.model.overrides")
    return DiT(config)


def _check_data(spec: TrainSpec, model: DiT, identity: dict[str, Any]) -> None:
    """The dataset must hold what this model reads, in shapes it takes: one line naming the key otherwise."""
    folder, cfg = spec.data.shards, model.config
    text = identity.get("text")
    if text is not None and text["dim"] != cfg.text_dim:
        raise UserError(f"{folder}: train.model: the dataset's text states have {text['dim']} dims, the model "
                        f"takes {cfg.text_dim} (model.overrides.text_dim: {text['dim']})")
    shapes = identity["latent"]["shapes"]
    if cfg.kind == "motion":
        kind = identity["encoder"]["kind"]
        if kind not in ("reducio",):
            raise UserError(f"{folder}: train.data.shards: a motion model trains on autoencoder latents with a "
                            f"content frame (encoder reducio); this dataset holds {kind!r} latents")
        for bucket, shape in shapes.items():
            if shape[0] != cfg.in_channels or shape[1] != cfg.frames_per_clip:
                raise UserError(f"{folder}: train.model: latents of bucket {bucket} are {shape}, the model takes "
                                f"{cfg.in_channels} channels and {cfg.frames_per_clip} frames per clip")


def _wrap(model: DiT, spec: TrainSpec, device: torch.device, bf16: bool) -> torch.nn.Module:
    """Activation checkpointing (recompute each block in backward), then the parallelism."""
    model.recompute_blocks = spec.activation_checkpointing
    if spec.parallel == "none":
        return model
    return parallelize(model, spec.parallel, device, mixed_precision=bf16 and spec.parallel == "fsdp2")


def model_inputs(kind: str, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, Optional[MotionCond]]:
    """A dataset batch -> the clean sample x1 the flow noises, and the motion model's conditioning."""
    frames = batch["content"].to(device).permute(0, 2, 1, 3, 4).float() / 127.5 - 1.0   # (B, 3, K, H, W)
    if kind == "keyframe":
        return frames, None
    latents = batch["latents"].to(device).float()                              # (B, K, C, T', h, w)
    B, K, C, Tp, h, w = latents.shape
    x1 = latents.permute(0, 2, 1, 3, 4, 5).reshape(B, C, K * Tp, h, w)          # (B, C, K T', h, w)
    return x1, MotionCond(frames)


def text_inputs(batch: dict[str, Any], batch_size: int, dim: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) states and (B, L) mask; a dataset without text gives one masked token (the model's null key)."""
    if "text_states" not in batch:
        return torch.zeros(batch_size, 1, dim, device=device), torch.zeros(batch_size, 1, dtype=torch.bool,
                                                                           device=device)
    return batch["text_states"].to(device).float(), batch["text_mask"].to(device)


def _subset(cond: Optional[MotionCond], index: torch.Tensor) -> Optional[MotionCond]:
    return None if cond is None else MotionCond(cond.frames[index])


# ---------------------------------------------------------------------------------------------------- the trainer

class _Trainer:
    """Model, optimizer, EMA, flow and data of one run, so the loop in _run stays readable."""

    def __init__(self, spec: TrainSpec, env: Env, comm: Comm, device: torch.device):
        self.spec, self.env, self.comm, self.device = spec, env, comm, device
        self.out = Path(spec.output)
        self.bf16 = spec.precision == "bf16" or (spec.precision == "auto" and device.type == "cuda")
        self.identity = read_json(Path(spec.data.shards) / "dataset.json")
        if self.identity is None:
            raise UserError(f"{spec.data.shards}: train.data.shards: not a prep dataset (no dataset.json)")
        torch.manual_seed(spec.seed)                  # identical initial weights on every rank
        model = build_model(spec)
        _check_data(spec, model, self.identity)
        self.config, self.n_params = model.config, model.num_params()
        self.model = _wrap(model.to(device), spec, device, self.bf16)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec.lr, betas=spec.betas,
                                     weight_decay=spec.weight_decay)
        self.ema = EMA(self.model, spec.ema_decay)
        self.flow = make_flow(spec.flow.kind, num_stages=spec.flow.stages if spec.flow.kind == "pyramidal" else None)
        self.data = ShardDataset(spec.data.shards, spec.batch_size, rank=env.rank, world_size=env.world_size,
                                 sequence=spec.data.sequence, seed=spec.seed, prefetch=spec.data.prefetch,
                                 allow_incomplete=spec.data.allow_incomplete, min_batches=spec.grad_accum)

    def warn(self, message: str) -> None:
        if self.env.is_main:
            print(f"hpcvid train: warning: {message}", file=sys.stderr, flush=True)

    def model_meta(self) -> dict[str, Any]:
        from hpcvid.train.autoencoder import config_to_dict

        m = self.spec.model
        return {"kind": m.kind, "preset": m.preset, "overrides": m.overrides, "config": config_to_dict(self.config),
                "parameters": self.n_params}

    # ------------------------------------------------------------------------------------------------ state

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.model), "optim": get_optimizer_state_dict(self.model, self.opt),
                "ema": self.ema.state_dict()}

    def resume(self) -> tuple[int, Optional[dict], Optional[Path]]:
        """The newest verified checkpoint (rank 0 hashes, every rank loads its shards): (step, meta, folder)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        choice = None
        if self.env.is_main:
            for _, folder, meta in ck.verified_checkpoints(self.out, self.warn):
                choice = (str(folder), meta)
                break
        choice = self.comm.broadcast(choice)
        if choice is None:
            return 0, None, None
        folder, meta = Path(choice[0]), choice[1]
        if meta.get("model", {}).get("config") != self.model_meta()["config"] or not meta.get("sharded"):
            raise UserError(f"{folder}: this output folder holds a checkpoint of another model; choose a new "
                            f"train.output or delete the folder")
        state = self._state()
        load_sharded(folder, state)
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.opt, state["optim"])
        self.ema.load_state_dict(state["ema"])
        self.data.load_state_dict(meta["data"])
        return int(meta["step"]), meta, folder

    def save(self, step: int, extra: dict[str, Any]) -> Path:
        """Collective. Never writes NaN/inf (RunStopped on every rank instead), prunes to keep_last on rank 0."""
        bad = sum(int(not bool(torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p).all()))
                  for p in self.model.parameters())
        if self.comm.all_reduce(np.array([bad], np.int64), op="sum")[0]:
            raise RunStopped(f"step {step}: weights hold NaN or inf; not saved, the checkpoints in "
                             f"{self.out / ck.CHECKPOINTS} are left as they were; lower train.lr")
        folder = ck.step_dir(self.out, step)
        exports = {"ema": self.ema.full_state_dict()}        # collective under FSDP2
        meta = {"step": step, "model": self.model_meta(), "data": self.data.state_dict(), "spec": to_dict(self.spec),
                "sample_shape": getattr(self, "sample_shape", None),
                "world_size": self.env.world_size, "parallel": self.spec.parallel,
                "hpcvid_version": hpcvid.__version__, **extra}
        save_sharded(folder, self._state(), meta, self.comm, exports if self.env.is_main else None)
        if self.env.is_main:
            ck.prune_checkpoints(self.out, self.spec.keep_last, self.warn)
        self.comm.barrier()
        return folder

    # ------------------------------------------------------------------------------------------------ steps

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def micro_step(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict, int]:
        """Loss of one micro-batch over the pyramid's stages (summed by share of samples), per-stage losses, tokens."""
        x1, cond = model_inputs(self.spec.model.kind, batch, self.device)
        self.sample_shape = list(x1.shape[1:])                                  # what `hpcvid sample` must draw
        B = x1.shape[0]
        text, mask = text_inputs(batch, B, self.config.text_dim, self.device)
        drop = text_dropout_mask(B, self.spec.flow.text_dropout, generator, self.device)
        mask = mask & ~drop[:, None]                                             # (B, L)
        total, per_stage, tokens = x1.new_zeros(()), {}, 0
        for sb in self.flow.training_batches(x1, generator):
            idx = sb.index
            with self.autocast():
                v = self.model(sb.x_t, sb.t, text[idx], mask[idx], _subset(cond, idx), spatial_factor=sb.factor)
            loss = (v.float() - sb.target.float()).pow(2).mean()
            total = total + loss * (len(idx) / B)
            per_stage[f"loss_stage{sb.stage}"] = float(loss.detach())
            tokens += len(idx) * self.config_tokens(sb.x_t.shape[2:])
        return total, per_stage, tokens

    def config_tokens(self, thw: tuple[int, ...]) -> int:
        T, H, W = thw
        return T * (H // self.config.patch_size) * (W // self.config.patch_size)

    def step(self, step: int, batches) -> tuple[dict[str, float], bool, int]:
        """One optimizer step over grad_accum micro-batches: (terms, skipped, tokens on this rank)."""
        spec = self.spec
        for group in self.opt.param_groups:
            group["lr"] = warmup_cosine(step, spec.lr, spec.warmup_steps, spec.steps, spec.min_lr)
        self.opt.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        loss_sum, tokens = 0.0, 0
        for micro in range(spec.grad_accum):
            generator = torch.Generator().manual_seed(step_seed(spec.seed, step * spec.grad_accum + micro,
                                                                self.env.rank))
            loss, per_stage, n = self.micro_step(next(batches), generator)
            (loss / spec.grad_accum).backward()
            loss_sum += float(loss.detach()) / spec.grad_accum
            tokens += n
            for k, v in per_stage.items():
                terms[k] = terms.get(k, 0.0) + v / spec.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), spec.grad_clip or math.inf)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        bad = np.array([float(not (math.isfinite(loss_sum) and math.isfinite(norm)))])
        skipped = bool(self.comm.all_reduce(bad, op="max")[0] > 0)             # the same decision on every rank
        if skipped:
            self.opt.zero_grad(set_to_none=True)
        else:
            self.opt.step()
            self.ema.update(self.model)
        terms.update(loss=loss_sum, grad_norm=norm, lr=self.opt.param_groups[0]["lr"])
        return terms, skipped, tokens


# ---------------------------------------------------------------------------------------------------- stage

def run(spec: TrainSpec, env: Env, comm: Optional[Comm] = None) -> TrainResult:
    comm = comm or make_comm(env)
    with training_process("train", env, comm, spec.device, spec.torch_threads) as device:
        return _run(spec, env, comm, device)


def _run(spec: TrainSpec, env: Env, comm: Comm, device: torch.device) -> TrainResult:
    start = time.time()
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(spec, env, comm, device)
    start_step, meta, folder = trainer.resume()
    peak = spec.peak_tflops or matmul_tflops(device, torch.bfloat16 if trainer.bf16 else torch.float32)
    log = TrainingLog(out, resume_step=start_step if meta else None, enabled=env.is_main)
    sample_every = spec.sample_every

    def after_step(done: int) -> None:
        if sample_every and done % sample_every == 0 and done < spec.steps:
            _samples(trainer, out, done)

    loop = TrainLoop(name="train", section="train", steps=spec.steps, log_every=spec.log_every,
                     checkpoint_every=spec.checkpoint_every, max_nonfinite_steps=spec.max_nonfinite_steps, env=env,
                     comm=comm, device=device, log=log, progress=spec.progress,
                     flops_per_token=6 * trainer.n_params, peak_tflops=peak, after_step=after_step)
    batches = iter(trainer.data)
    try:
        outcome = loop.run(start_step, lambda step: trainer.step(step, batches), trainer.save, folder, spec.lr)
    finally:
        trainer.data.close()
    last, folder = outcome.last, outcome.folder
    seconds = time.time() - start
    pictures = _samples(trainer, out, spec.steps)
    tokens_all = int(comm.all_reduce(np.array([outcome.tokens_per_step], np.int64), op="sum")[0])
    result = TrainResult(
        str(out), spec.model.kind, spec.model.preset, env.world_size, start_step, spec.steps, round(seconds, 2),
        loop.median_step(outcome), last.get("loss") if last else None, outcome.skipped,
        str(folder or ""), tokens_all, last.get("mfu") if last else None,
        extra={"peak_tflops": round(peak, 4), "peak_source": "train.peak_tflops" if spec.peak_tflops else
               "a measured matmul on this device", "samples": pictures, "data": trainer.data.describe(),
               "flow": to_dict(spec.flow), "parameters": trainer.n_params})
    result.summary = format_summary(result, trainer, device)
    if env.is_main:
        atomic_write_json(out / "train_report.json", {**asdict(result), "model": trainer.model_meta()})
        _plot(out)
        print(result.summary, flush=True)
    return result


def _plot(out: Path) -> None:
    """loss_curves.png from metrics.jsonl: the total loss, each pyramid stage's, and the gradient norm."""
    from hpcvid.train.pictures import plot_curves

    path = out / "metrics.jsonl"
    if not path.exists():
        return
    records = read_jsonl(path)
    keys = sorted({k for r in records for k in r if k.startswith("loss")}) + ["grad_norm"]
    plot_curves(records, keys, out / "loss_curves.png", "training loss (total and per pyramid stage), grad norm")


@torch.no_grad()
def _samples(trainer: _Trainer, out: Path, step: int) -> Optional[str]:
    """Keyframe models: frames sampled from the EMA weights for the first captions of the data, over the frames
    they were trained on, as samples.png. Motion models need an autoencoder to show anything: skipped here (see
    `hpcvid sample`). Collective (the EMA gather); rank 0 samples on an unwrapped copy."""
    if trainer.spec.model.kind != "keyframe":
        return None
    weights = trainer.ema.full_state_dict()
    if not trainer.env.is_main:
        return None
    from hpcvid.train.pictures import contact_sheet, write_png

    model = DiT(trainer.config).to(trainer.device).eval()
    model.load_state_dict(weights)
    batch = _first_batch(trainer.spec)
    real, _ = model_inputs("keyframe", batch, trainer.device)                    # (n, 3, K, H, W)
    n = real.shape[0]
    text, mask = text_inputs(batch, n, trainer.config.text_dim, trainer.device)
    generator = torch.Generator().manual_seed(trainer.spec.seed)
    guidance = trainer.spec.flow.guidance

    def velocity(x, t, factor):
        cond = model(x, t, text, mask, spatial_factor=factor)
        if guidance == 1.0:
            return cond
        return combine_guidance(cond, model(x, t, text, torch.zeros_like(mask), spatial_factor=factor), guidance)

    fake = sample(trainer.flow, velocity, tuple(real.shape), steps=trainer.spec.flow.sample_steps,
                  generator=generator, device=trainer.device)
    to_frames = lambda v: ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
    pairs = list(zip(to_frames(real), to_frames(fake)))                           # (K, H, W, 3) each
    path = out / "samples.png"
    write_png(path, contact_sheet(pairs, frames=real.shape[2]))
    return str(path)


def _first_batch(spec: TrainSpec, wanted: int = 4) -> dict[str, Any]:
    """The same few samples on every call (the first batch of a one-rank reading of the data, seeded): what the
    sample sheets draw beside their real frames."""
    for size in (wanted, 1):
        try:
            with ShardDataset(spec.data.shards, size, sequence=spec.data.sequence, seed=spec.seed, prefetch=0,
                              allow_incomplete=spec.data.allow_incomplete) as data:
                return next(iter(data))
        except UserError:
            if size == 1:
                raise
    raise AssertionError("unreachable")


def format_summary(r: TrainResult, trainer: _Trainer, device: torch.device) -> str:
    spec = trainer.spec
    precision = "bf16" if trainer.bf16 else "fp32"
    lines = [
        f"train: {r.output}  ({r.kind} {r.preset}, {trainer.n_params / 1e6:.2f}M parameters, {r.world_size} "
        f"rank{'s' if r.world_size > 1 else ''} {spec.parallel} on {device.type}, {precision}; flow {spec.flow.kind}"
        f"{f' {spec.flow.stages} stages' if spec.flow.kind == 'pyramidal' else ''})",
        f"  data: {r.extra['data']}",
    ]
    if r.seconds_per_step is not None:
        mfu = f"{100 * r.mfu:.2f}% of {r.extra['peak_tflops']:.3g} TFLOP/s per rank ({r.extra['peak_source']})" \
            if r.mfu is not None else "n/a"
        lines.append(f"  steps {r.start_step} -> {r.steps} in {r.seconds:.1f} s: {r.seconds_per_step:.3f} s/step "
                     f"(median), {r.tokens_per_step} tokens/step over the ranks; last loss "
                     f"{r.final_loss if r.final_loss is None else f'{r.final_loss:.4f}'}; MFU {mfu}"
                     f"{f'; {r.skipped_steps} steps skipped (non-finite)' if r.skipped_steps else ''}")
    else:
        lines.append(f"  already at step {r.start_step} (train.steps {r.steps}): nothing to do")
    lines.append(f"  checkpoint {r.checkpoint} (ema.safetensors inside: the weights for sampling); metrics "
                 f"{Path(r.output) / 'metrics.jsonl'}" + (f"; samples {r.extra['samples']}" if r.extra['samples']
                                                           else ""))
    return "\n".join(lines)


def progress(spec: TrainSpec) -> str:
    """Step of the latest complete checkpoint out of train.steps (for `hpcvid status`)."""
    return ck.training_progress(spec.output, spec.steps)

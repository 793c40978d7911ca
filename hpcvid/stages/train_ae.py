"""The train_ae stage: train a Reducio-VAE or CMD autoencoder on decoded clips, data-parallel, resumable.

Launch (the stage itself does not know which was used):
    hpcvid train-ae jobs/tiny_reducio.yaml                               # one process
    mpiexec -n 2 hpcvid train-ae jobs/tiny_reducio.yaml                  # 2 ranks (torch.distributed over gloo/NCCL)
    torchrun --nproc-per-node 8 -m hpcvid.cli train-ae jobs/paper_reducio.yaml     # one GPU node
    hpcvid submit PIPELINE.yaml --cluster slurm                          # as a pipeline stage (requeued on preemption)

Data: from a manifest, each rank decodes its share of the videos (rows rank, rank + W, ...) once into memory and
draws batches from it; from a pixels prep dataset (source: shards), batches stream from the shards with bounded
memory (hpcvid.data.clips.ClipStream) and the data position goes into every checkpoint. The model is wrapped by
DDP or FSDP2 from outside (hpcvid.parallel.fsdp). A rerun resumes from the latest complete checkpoint in OUTPUT
and, because every random draw is seeded by (seed, step, rank) and the stream's position is restored, continues
exactly as the uninterrupted run would have. Rank 0 writes OUTPUT/metrics.jsonl (and the same scalars as
TensorBoard events in OUTPUT/tensorboard/), checkpoints, train_report.json and curves.png.

Safety: a resume trusts only a checkpoint whose files match the sha256 in its meta.json (a damaged one is skipped
with a warning and the one before it is used). A step whose loss or global gradient norm is not finite is skipped
on every rank alike (no update); `max_nonfinite_steps` of them in a row stop the run with RunStopped (exit 3, so a
scheduler does not requeue it), and nothing is saved while the newest steps are non-finite, so a diverging run
never writes a checkpoint that would push the good ones out.
"""
from __future__ import annotations

import math
import statistics
import time
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

import hpcvid
from hpcvid.config import RunStopped, TrainAESpec, UserError, to_dict
from hpcvid.data.clips import ClipStream, load_clips
from hpcvid.dist import Comm, Env, make_comm
from hpcvid.io import atomic_write_json
from hpcvid.train import checkpoint as ck
from hpcvid.train.autoencoder import (build_model, check_clip_size, config_to_dict, count_parameters, last_layer,
                                      model_config, reconstruct, train_pass)
from hpcvid.parallel.fsdp import parallelize
from hpcvid.train.losses import PatchDiscriminator3d, adaptive_gan_weight, hinge_d_loss, ssim_loss
from hpcvid.train.loop import TrainLoop
from hpcvid.train.metrics import TrainingLog, from_uint8, psnr, read_jsonl, ssim, to_uint8
from hpcvid.train.pictures import curves_png
from hpcvid.train.runtime import step_seed, training_process


@dataclass
class TrainAEResult:
    output: str
    kind: str
    preset: str
    world_size: int
    start_step: int              # > 0 when this run resumed from a checkpoint
    steps: int
    clips: int                   # training clips over all ranks
    seconds: float
    seconds_per_step: Optional[float]      # median over this run's steps (checkpoint saving not included)
    final_loss: Optional[float]
    final_psnr: Optional[float]            # batch PSNR (dB) of the last logged interval
    probe: dict[str, Any]                  # PSNR/SSIM of fixed clips at the start and the end of training
    checkpoint: str
    summary: str
    skipped_steps: int = 0                 # steps skipped for a non-finite loss or gradient norm (no update)


# ---------------------------------------------------------------------------------------------------- set-up

def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small CPU tensor over the ranks (NCCL reduces only GPU tensors); returns it on the CPU."""
    t = t.to(device)
    torch.distributed.all_reduce(t)
    return t.cpu()


class _Trainer:
    """The pieces of one training run (model, optimizers, data, logs), so the loop below stays readable."""

    def __init__(self, spec: TrainAESpec, env: Env, comm: Comm, device: torch.device):
        self.spec, self.env, self.comm, self.device = spec, env, comm, device
        self.out = Path(spec.output)
        self.kind = spec.model.kind
        self.cfg = model_config(self.kind, spec.model.preset, spec.model.overrides)
        self.T, (self.H, self.W) = spec.data.clip.num_frames, spec.data.resolution
        check_clip_size(self.kind, self.cfg, self.T, self.H, self.W)
        self.pixels_per_clip = 3 * self.T * self.H * self.W
        self.bf16 = spec.precision == "bf16" or (spec.precision == "auto" and device.type == "cuda")

        torch.manual_seed(spec.seed)             # identical initial weights on every rank
        model = build_model(self.kind, self.cfg).to(device)
        self.n_params = count_parameters(model)
        wrap = env.world_size > 1 or spec.parallel == "fsdp2"
        self.model = parallelize(model, spec.parallel, device) if wrap else model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec.lr, betas=spec.betas,
                                     weight_decay=spec.weight_decay)
        self.disc = self.d_opt = None
        if spec.loss.gan > 0:
            smallest = 3 * 2 ** spec.loss.disc_layers     # each layer halves H and W; the last two convs need >= 2
            if min(self.H, self.W) < smallest:
                raise UserError(f"train_ae.loss.disc_layers={spec.loss.disc_layers} needs frames of at least "
                                f"{smallest} pixels a side, resolution is {self.H}x{self.W}; use fewer layers")
            disc = PatchDiscriminator3d(3, spec.loss.disc_channels, spec.loss.disc_layers).to(device)
            self.disc = parallelize(disc, "ddp", device) if env.world_size > 1 else disc
            self.d_opt = torch.optim.AdamW(self.disc.parameters(), lr=spec.loss.disc_lr or spec.lr, betas=(0.5, 0.9),
                                           weight_decay=spec.weight_decay)

    # ------------------------------------------------------------------------------------------------ state

    def model_meta(self) -> dict[str, Any]:
        m = self.spec.model
        return {"kind": self.kind, "preset": m.preset, "overrides": m.overrides, "config": config_to_dict(self.cfg),
                "clip": [self.T, self.H, self.W], "parameters": self.n_params}

    def warn(self, message: str) -> None:
        """One line on stderr from rank 0 (the others would repeat it)."""
        if self.env.is_main:
            print(f"hpcvid train-ae: warning: {message}", file=sys.stderr, flush=True)

    def resume(self) -> tuple[int, Optional[dict], Optional[Path]]:
        """Load the newest good checkpoint in OUTPUT: (its step, meta, folder), or (0, None, None) if there is none.

        Rank 0 alone hashes (the files are the same for every rank) and says which folder; every rank then reads it
        and they agree on whether it loaded, so all ranks resume from the same step. A checkpoint that fails (sha256,
        an unreadable file, NaN/inf inside) is skipped with a one-line warning and the one before it is tried."""
        before = None
        while True:
            choice = None
            if self.env.is_main:
                for _, found, meta in ck.verified_checkpoints(self.out, self.warn, before):
                    choice = (str(found), meta)
                    break
            choice = self.comm.broadcast(choice)
            if choice is None:
                return 0, None, None
            folder, meta = Path(choice[0]), choice[1]
            had = meta["model"]
            if had["kind"] != self.kind or had["config"] != config_to_dict(self.cfg):
                raise UserError(f"{folder}: this output folder holds a checkpoint of another model ({had['kind']} "
                                f"{had.get('preset')}, config differs); choose a new train_ae.output or delete the "
                                f"folder")
            try:
                state, problem = self._read(folder), None
            except UserError as e:
                state, problem = None, str(e)
            problems = [p for p in self.comm.all_gather(problem) if p]
            if not problems:
                break
            self.warn(f"checkpoint {folder} skipped: {problems[0]}")
            before = int(meta["step"])
        weights, optim, disc = state
        ck.load_full_state(self.model, self.opt, weights, optim)
        if disc is not None:
            ck.load_full_state(self.disc, self.d_opt, *disc)
        if not ck.has_hashes(meta):
            self.warn(f"checkpoint {folder} has no sha256 in its meta.json (written by an older hpcvid): checked by "
                      f"file sizes and for NaN/inf only")
        return int(meta["step"]), meta, folder

    def _read(self, folder: Path) -> tuple[dict, dict, Optional[tuple[dict, dict]]]:
        """Every file of a checkpoint in memory (UserError naming a file that is damaged or holds NaN/inf), so that
        nothing is loaded into the model unless all of it is good."""
        weights, optim = ck.load_weights(folder, "model"), ck.load_state(folder, "optimizer")
        disc = None
        if self.disc is not None and (folder / "discriminator.safetensors").exists():
            disc = ck.load_weights(folder, "discriminator"), ck.load_state(folder, "disc_optimizer")
        return weights, optim, disc

    def save(self, step: int, extra: dict[str, Any]) -> Path:
        """Collective (FSDP2 gathers shards); rank 0 checks that every weight and optimizer value is finite, writes,
        and prunes to keep_last (never when the newest checkpoint is damaged); every rank waits for it. Non-finite
        state is never written: every rank raises RunStopped together."""
        weights, optim = ck.full_state(self.model, self.opt)
        dweights = doptim = None
        if self.disc is not None:
            dweights, doptim = ck.full_state(self.disc, self.d_opt)
        folder = ck.step_dir(self.out, step)
        tensors, states = {"model": weights}, {"optimizer": optim}
        if dweights is not None:
            tensors["discriminator"], states["disc_optimizer"] = dweights, doptim
        bad = None
        if self.env.is_main:        # under FSDP2 only rank 0 holds the full state
            bad = next(([name, names[0], len(names)] for name, state in {**tensors, **states}.items()
                        if (names := ck.nonfinite_tensors(state))), None)
        bad = self.comm.broadcast(bad)
        if bad is not None:
            raise RunStopped(f"step {step}: {bad[2]} tensor(s) of the {bad[0]} state hold NaN or inf "
                             f"(e.g. {bad[1]}); not saved, and the checkpoints in {self.out / ck.CHECKPOINTS} are "
                             f"left as they were; lower train_ae.lr or set grad_clip")
        if self.env.is_main:
            meta = {"step": step, "model": self.model_meta(), "spec": to_dict(self.spec),
                    "world_size": self.env.world_size, "parallel": self.spec.parallel,
                    "hpcvid_version": hpcvid.__version__, **extra}
            ck.save_checkpoint(folder, tensors, states, meta)
            ck.prune_checkpoints(self.out, self.spec.keep_last, self.warn)
        torch.distributed.barrier()
        return folder

    # ------------------------------------------------------------------------------------------------ passes

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def lr_at(self, step: int) -> float:
        if self.spec.warmup_steps and step < self.spec.warmup_steps:
            return self.spec.lr * (step + 1) / self.spec.warmup_steps
        return self.spec.lr

    @torch.no_grad()
    def probe(self, frames: torch.Tensor) -> dict[str, float]:
        """Mean PSNR/SSIM of the reconstructions (quantised to uint8, as stored video would be) of fixed clips on
        every rank. Collective: every rank calls it with its own probe clips."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for i in range(0, len(frames), self.spec.batch_size):
            x = from_uint8(frames[i:i + self.spec.batch_size]).to(self.device)   # (b, 3, T, H, W)
            with self.autocast():
                recon = reconstruct(self.kind, self.model, x)
            r = from_uint8(to_uint8(recon).permute(0, 2, 3, 4, 1))
            sums += torch.tensor([psnr(r, x).sum().item(), ssim(r, x).sum().item(), len(x)], dtype=torch.float64)
        self.model.train()
        sums = all_reduce_sum(sums, self.device)
        n = max(sums[2].item(), 1)
        return {"psnr": round(sums[0].item() / n, 3), "ssim": round(sums[1].item() / n, 4), "clips": int(sums[2])}

    def step(self, step: int, frames: torch.Tensor) -> tuple[dict[str, float], bool]:
        """One optimizer step on a batch of uint8 clips (B, T, H, W, 3) (and one discriminator step once the GAN is
        on): (the loss terms as floats, skipped).

        Skipped (no update on any rank, gradients dropped) when the loss, the global gradient norm, or the
        discriminator's, is NaN or inf on any rank: the decision rests on one all-reduced flag, so the ranks never
        diverge (a DDP/FSDP2 rank that stepped while another skipped would desynchronise them)."""
        spec, loss_spec = self.spec, self.spec.loss
        seed = step_seed(spec.seed, step, self.env.rank)
        x = from_uint8(frames).to(self.device, non_blocking=True)           # (B, 3, T, H, W) in [-1, 1]
        noise = torch.Generator(device=self.device).manual_seed(seed + 1)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)
        with self.autocast():
            recon, kl = train_pass(self.kind, self.model, x, noise)
        recon = recon.float()
        l1 = (recon - x).abs().mean()
        rec = loss_spec.l1 * l1
        terms = {"l1": l1}
        if loss_spec.mse > 0:
            mse = (recon - x).pow(2).mean()
            rec = rec + loss_spec.mse * mse
            terms["mse"] = mse
        if kl is not None:
            kl_mean = kl.mean()
            rec = rec + loss_spec.kl * kl_mean / self.pixels_per_clip
            terms["kl"] = kl_mean
        if loss_spec.ssim > 0:
            s = ssim_loss(recon, x)
            rec = rec + loss_spec.ssim * s
            terms["ssim"] = 1.0 - s
        loss = rec
        gan_on = self.disc is not None and step >= loss_spec.gan_start_step
        if gan_on:
            disc = getattr(self.disc, "module", self.disc)   # the generator pass must not touch DDP's reducer
            disc.requires_grad_(False)
            g_loss = -disc(recon).mean()
            weight = adaptive_gan_weight(rec, g_loss, last_layer(self.kind, self.model)) * loss_spec.gan
            loss = loss + weight * g_loss
            terms.update(g_loss=g_loss, gan_weight=weight)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # the global norm is always measured (max_norm inf clips nothing): it is what every rank agrees on
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), spec.grad_clip or math.inf)
        terms["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        checked = [loss, terms["grad_norm"]]
        if gan_on:      # before the generator's update: the discriminator sees only x and the detached recon
            getattr(self.disc, "module", self.disc).requires_grad_(True)
            d_loss = hinge_d_loss(self.disc(x), self.disc(recon.detach()))
            self.d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_norm = torch.nn.utils.clip_grad_norm_(self.disc.parameters(), math.inf)
            terms["d_loss"] = d_loss
            checked += [d_loss, d_norm]
        bad = torch.tensor([float(not all(math.isfinite(float(v.detach())) for v in checked))], dtype=torch.float64)
        if self.env.world_size > 1:
            bad = all_reduce_sum(bad, self.device)
        skipped = bool(bad.item() > 0)
        if skipped:
            self.opt.zero_grad(set_to_none=True)
            if gan_on:
                self.d_opt.zero_grad(set_to_none=True)
        else:
            self.opt.step()
            if gan_on:
                self.d_opt.step()
        terms.update(loss=loss, psnr=psnr(recon.detach(), x).mean())
        return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()}, skipped


# ---------------------------------------------------------------------------------------------------- stage

def run(spec: TrainAESpec, env: Env, comm: Optional[Comm] = None) -> TrainAEResult:
    comm = comm or make_comm(env)
    with training_process("train-ae", env, comm, spec.device, spec.torch_threads) as device:
        return _run(spec, env, comm, device)


class _MemoryBatches:
    """Batches drawn with replacement from clips decoded into memory, seeded by (seed, step, rank): nothing to save."""

    def __init__(self, spec: TrainAESpec, env: Env, comm: Comm):
        self.spec, self.rank = spec, env.rank
        clips = load_clips(spec.data, env.rank, env.world_size)
        self.frames = clips.frames                                           # (N, T, H, W, 3) uint8
        counts = comm.all_gather((len(clips.frames), clips.videos, clips.problems))
        problems = _merge([p for _, _, p in counts])
        if any(n == 0 for n, _, _ in counts):
            empty = [r for r, (n, _, _) in enumerate(counts) if n == 0]
            raise UserError(f"train_ae.data: rank(s) {empty} got no clips ({sum(v for _, v, _ in counts)} usable "
                            f"videos for {env.world_size} ranks; problems: {problems or 'none'}); add videos, lower "
                            f"clip.num_frames, or use fewer ranks")
        self.clips = sum(n for n, _, _ in counts)
        self.smallest = min(n for n, _, _ in counts)
        self.videos = sum(v for _, v, _ in counts)
        self.problems = problems

    def next(self, step: int) -> torch.Tensor:
        seed = step_seed(self.spec.seed, step, self.rank)
        idx = torch.randint(len(self.frames), (self.spec.batch_size,), generator=torch.Generator().manual_seed(seed))
        return self.frames[idx]

    def fixed(self, n: int) -> torch.Tensor:
        # the same number on every rank: under FSDP2 each forward pass is a collective
        return self.frames[:min(n, self.smallest)]

    def describe(self) -> str:
        T, (H, W) = self.spec.data.clip.num_frames, self.spec.data.resolution
        return (f"{self.clips} clips of {T}x{H}x{W} in memory from {self.videos} videos"
                f"{'; without clips: ' + self.problems if self.problems else ''}")

    def close(self) -> None:
        pass


def _run(spec: TrainAESpec, env: Env, comm: Comm, device: torch.device) -> TrainAEResult:
    start = time.time()
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(spec, env, comm, device)
    start_step, meta, folder = trainer.resume()
    if spec.data.source == "shards":
        stream = ClipStream(spec.data, spec.batch_size, env.rank, env.world_size, spec.seed)
        if meta and "data_position" in meta:
            stream.load_state_dict(meta["data_position"])
        elif meta:
            trainer.warn(f"checkpoint {folder} has no data position (written from another source): the data "
                         f"stream starts from its beginning")
    else:
        stream = None
    data = stream or _MemoryBatches(spec, env, comm)
    try:
        return _train(spec, env, comm, device, trainer, data, stream, start_step, meta, folder, start)
    finally:
        data.close()


def _train(spec: TrainAESpec, env: Env, comm: Comm, device: torch.device, trainer: _Trainer, data, stream,
           start_step: int, meta: Optional[dict], folder: Optional[Path], start: float) -> TrainAEResult:
    out = Path(spec.output)
    probe_frames = data.fixed(spec.probe_clips)
    probe_start = meta.get("probe_start") if meta else trainer.probe(probe_frames)
    log = TrainingLog(out, resume_step=start_step if meta else None, enabled=env.is_main)
    extra = {"probe_start": probe_start, "data": {"clips": data.clips, "clip": [trainer.T, trainer.H, trainer.W]}}

    next_batch = (lambda step: stream.next()) if stream else data.next

    def step_fn(step: int) -> tuple[dict[str, float], bool, int]:
        terms, skipped = trainer.step(step, next_batch(step))
        return {**terms, "lr": trainer.lr_at(step)}, skipped, 0

    def save_fn(step: int, extra: dict[str, Any]) -> Path:
        return trainer.save(step, {**extra, "data_position": stream.state_dict()} if stream else extra)

    loop = TrainLoop(name="train-ae", section="train_ae", steps=spec.steps, log_every=spec.log_every,
                     checkpoint_every=spec.checkpoint_every, max_nonfinite_steps=spec.max_nonfinite_steps, env=env,
                     comm=comm, device=device, log=log, progress=spec.progress, postfix=("loss", "psnr"))
    outcome = loop.run(start_step, step_fn, save_fn, folder, spec.lr, extra)
    last, folder, times, skipped_total = outcome.last, outcome.folder, outcome.times, outcome.skipped
    probe_end = trainer.probe(probe_frames)
    seconds = time.time() - start
    probe = {"clips": probe_end["clips"], "start": probe_start, "end": probe_end}
    if last is None and env.is_main and (out / "metrics.jsonl").exists():
        records = read_jsonl(out / "metrics.jsonl")
        last = records[-1] if records else None
    result = TrainAEResult(
        str(out), trainer.kind, spec.model.preset, env.world_size, start_step, spec.steps, data.clips,
        round(seconds, 2), round(statistics.median(times), 4) if times else None,
        last.get("loss") if last else None, last.get("psnr") if last else None, probe, str(folder), "",
        skipped_total)
    result.summary = format_summary(result, trainer, f"streamed from {data.describe()}" if stream else data.describe(),
                                    device)
    if env.is_main:
        atomic_write_json(out / "train_report.json", {**asdict(result), "model": trainer.model_meta()})
        curves_png(read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else [], out / "curves.png")
        print(result.summary, flush=True)
    return result


def _merge(problems: list[dict[str, int]]) -> str:
    merged: dict[str, int] = {}
    for p in problems:
        for k, v in p.items():
            merged[k] = merged.get(k, 0) + v
    return ", ".join(f"{k} {v}" for k, v in sorted(merged.items()))


def _num(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_summary(r: TrainAEResult, trainer: _Trainer, data: str, device: torch.device) -> str:
    spec = trainer.spec
    precision = "bf16 autocast" if trainer.bf16 else "fp32"
    p0, p1 = r.probe.get("start") or {}, r.probe["end"]
    lines = [
        f"train-ae: {r.output}  ({r.kind} {r.preset}, {trainer.n_params / 1e6:.2f}M parameters, {r.world_size} "
        f"rank{'s' if r.world_size > 1 else ''} {spec.parallel if r.world_size > 1 else 'single'} on "
        f"{device.type}, {precision})",
        f"  data: {data}",
    ]
    if r.seconds_per_step is not None:
        skipped = f"; {r.skipped_steps} non-finite step(s) skipped" if r.skipped_steps else ""
        lines.append(f"  steps {r.start_step} -> {r.steps} in {r.seconds:.1f} s: {r.seconds_per_step:.3f} s/step "
                     f"(median), batch {spec.batch_size} x {r.world_size} rank(s); last loss {_num(r.final_loss, 4)}, "
                     f"batch PSNR {_num(r.final_psnr, 2)} dB{skipped}")
    else:
        lines.append(f"  already at step {r.start_step} (train_ae.steps {r.steps}): nothing to do; raise "
                     f"train_ae.steps to go on")
    if p0:
        lines.append(f"  probe ({p1['clips']} fixed clips, eval mode): PSNR {p0['psnr']:.2f} -> {p1['psnr']:.2f} dB, "
                     f"SSIM {p0['ssim']:.3f} -> {p1['ssim']:.3f}")
    lines.append(f"  checkpoint {r.checkpoint}; metrics {Path(r.output) / 'metrics.jsonl'}; curves "
                 f"{Path(r.output) / 'curves.png'}; tensorboard --logdir {Path(r.output) / 'tensorboard'}")
    return "\n".join(lines)


def progress(spec: TrainAESpec) -> str:
    """Step of the latest complete checkpoint out of train_ae.steps (for `hpcvid status`)."""
    return ck.training_progress(spec.output, spec.steps)


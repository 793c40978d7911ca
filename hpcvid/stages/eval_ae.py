"""The eval_ae stage: how well a trained autoencoder reconstructs held-out clips, and how much it compresses them.

    hpcvid eval-ae jobs/tiny_reducio.yaml                  # reads the eval_ae: section
    mpiexec -n 2 hpcvid eval-ae jobs/tiny_reducio.yaml     # clips split over ranks, one report

Writes OUTPUT/report.json (PSNR, SSIM and temporal error per clip and overall, beside the same measures for the
clip's centre frame repeated, the baseline every such autoencoder must beat; the compression figures; the checkpoint)
and OUTPUT/contact_sheet.png (for each of the first clips: its original frames over their reconstruction).
Reconstructions are quantised to uint8 before measuring, as a decoded video would be; PSNR is per clip over all its
pixels (peak 255), SSIM the mean over frames of the Gaussian-window SSIM; "overall" is the mean over clips.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from hpcvid.config import EvalAESpec, UserError, to_dict
from hpcvid.io import atomic_write_json
from hpcvid.dist import Comm, Env, make_comm
from hpcvid.data.clips import load_clips
from hpcvid.train.runtime import cpu_threads, pick_device
from hpcvid.train.autoencoder import check_clip_size, compression, load_autoencoder, reconstruct
from hpcvid.train.metrics import from_uint8, psnr, ssim, temporal_error, to_uint8
from hpcvid.train.pictures import contact_sheet, write_png


@dataclass
class EvalAEResult:
    output: str
    checkpoint: str
    step: int
    clips: int
    psnr: float                  # mean over clips, dB
    ssim: float
    compression: dict[str, Any]
    seconds: float
    summary: str
    temporal_error: float = float("nan")   # grey levels, mean over clips
    baseline: Optional[dict[str, float]] = None   # the same measures for the repeated centre frame


def run(spec: EvalAESpec, env: Env, comm: Optional[Comm] = None) -> EvalAEResult:
    comm = comm or make_comm(env)
    start = time.time()
    device = pick_device(spec.device, env)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(env, spec.torch_threads))
    kind, cfg, model, meta = load_autoencoder(spec.checkpoint, device)
    T, (H, W) = spec.data.clip.num_frames, spec.data.resolution
    check_clip_size(kind, cfg, T, H, W)
    figures = compression(kind, cfg, T, H, W)

    clips = load_clips(spec.data, env.rank, env.world_size)
    rows, shown = [], []
    seconds_model = 0.0
    with torch.no_grad():
        for i in range(0, len(clips.frames), spec.batch_size):
            frames = clips.frames[i:i + spec.batch_size]                       # (b, T, H, W, 3) uint8
            x = from_uint8(frames).to(device)                                  # (b, 3, T, H, W)
            t = time.perf_counter()
            recon = to_uint8(reconstruct(kind, model, x)).permute(0, 2, 3, 4, 1).cpu()   # (b, T, H, W, 3)
            seconds_model += time.perf_counter() - t
            r, o = from_uint8(recon), from_uint8(frames)
            still = o[:, :, (o.shape[2] - 1) // 2, None].expand_as(o)          # the centre frame, repeated
            measured = zip(psnr(r, o).tolist(), ssim(r, o).tolist(), temporal_error(r, o).tolist(),
                           psnr(still, o).tolist(), ssim(still, o).tolist(), temporal_error(still, o).tolist())
            for j, (p, s, te, bp, bs, bte) in enumerate(measured):
                k = i + j
                rows.append({"clip_id": clips.ids[k], "order": list(clips.order[k]), "psnr": round(p, 3),
                             "ssim": round(s, 4), "temporal_error": round(te, 3), "baseline_psnr": round(bp, 3),
                             "baseline_ssim": round(bs, 4), "baseline_temporal_error": round(bte, 3)})
                if len(shown) < spec.contact_clips:
                    shown.append((clips.order[k], frames[j].numpy(), recon[j].numpy()))
    _check_latent_size(kind, model, device, T, H, W, figures["latent_elements"])   # figures vs a real encoding

    gathered = comm.all_gather((rows, shown, seconds_model, clips.problems))
    if not env.is_main:
        comm.barrier()
        return EvalAEResult(spec.output, meta["folder"], int(meta["step"]), 0, float("nan"), float("nan"), figures,
                            round(time.time() - start, 2), "")
    rows = sorted((r for g in gathered for r in g[0]), key=lambda r: r["order"])[:spec.data.max_clips]
    shown = sorted((s for g in gathered for s in g[1]), key=lambda s: s[0])[:spec.contact_clips]
    problems: dict[str, int] = {}
    for g in gathered:
        for k, v in g[3].items():
            problems[k] = problems.get(k, 0) + v
    if not rows:
        comm.barrier()
        raise UserError(f"eval_ae.data: no usable clips ({problems or 'no videos selected'}); check the manifest, "
                        f"include/exclude and clip.num_frames")
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    mean_psnr = statistics.mean(r["psnr"] for r in rows)
    mean_ssim = statistics.mean(r["ssim"] for r in rows)
    model_seconds = sum(g[2] for g in gathered)
    measures = ("psnr", "ssim", "temporal_error")
    baseline = {m: round(statistics.mean(r[f"baseline_{m}"] for r in rows), 4) for m in measures}
    report = {
        "format": "hpcvid-eval-ae", "checkpoint": meta["folder"], "step": meta["step"], "model": meta["model"],
        "data": to_dict(spec.data), "clips": len(rows),
        "overall": {"psnr": round(mean_psnr, 3), "ssim": round(mean_ssim, 4),
                    "temporal_error": round(statistics.mean(r["temporal_error"] for r in rows), 3),
                    "psnr_min": min(r["psnr"] for r in rows), "psnr_max": max(r["psnr"] for r in rows),
                    "ssim_min": min(r["ssim"] for r in rows), "ssim_max": max(r["ssim"] for r in rows)},
        "baseline": {"what": "the clip's centre frame (index (T-1)//2) repeated over the clip: what a decoder "
                             "handed that frame gives without reading its latent", **baseline},
        "beats_baseline": {"psnr": mean_psnr > baseline["psnr"], "ssim": mean_ssim > baseline["ssim"]},
        "per_clip": [{k: v for k, v in r.items() if k != "order"} for r in rows],
        "compression": figures, "problems": problems, "device": device.type, "ranks": env.world_size,
        "model_seconds_per_clip": round(model_seconds / max(len(rows), 1), 4),
        "seconds": round(time.time() - start, 2),
        "notes": "reconstructions quantised to uint8; PSNR per clip over all pixels (peak 255); SSIM Gaussian "
                 "window 11, sigma 1.5, per frame and channel; temporal_error = mean absolute difference between "
                 "the reconstruction's and the original's frame-to-frame changes, grey levels; overall = mean over "
                 "clips",
    }
    atomic_write_json(out / "report.json", report)
    write_png(out / "contact_sheet.png", contact_sheet([(o, r) for _, o, r in shown], spec.contact_frames))
    comm.barrier()
    result = EvalAEResult(str(out), meta["folder"], int(meta["step"]), len(rows), round(mean_psnr, 3),
                          round(mean_ssim, 4), figures, report["seconds"], "", report["overall"]["temporal_error"],
                          baseline)
    result.summary = format_summary(result, kind, meta, problems)
    print(result.summary, flush=True)
    return result


def _check_latent_size(kind: str, model, device, T: int, H: int, W: int, expected: int) -> None:
    with torch.no_grad():
        encoded = model.encode(torch.zeros(1, 3, T, H, W, device=device))
    got = encoded[0].numel() if kind == "reducio" else encoded[1].numel() + encoded[2].numel()   # mean | z_x + z_y
    if got != expected:
        raise RuntimeError(f"eval_ae: {kind} latent has {got} elements, the compression figures say "
                           f"{expected}")   # a bug in hpcvid.train.autoencoder.compression, not user input


def format_summary(r: EvalAEResult, kind: str, meta: dict, problems: dict[str, int]) -> str:
    c = r.compression
    side = next(iter(c["side_shapes"]))
    lines = [
        f"eval-ae: {r.output}  ({kind} {meta['model'].get('preset', '')}, checkpoint step {r.step}: {r.checkpoint})",
        f"  {r.clips} clips of {'x'.join(map(str, c['clip'][1:]))}: PSNR {r.psnr:.2f} dB, SSIM {r.ssim:.4f}, "
        f"temporal error {r.temporal_error:.2f} (mean over clips)"
        f"{'; without clips: ' + ', '.join(f'{k} {v}' for k, v in problems.items()) if problems else ''}",
        f"  centre frame repeated (the baseline): PSNR {r.baseline['psnr']:.2f} dB, SSIM {r.baseline['ssim']:.4f}, "
        f"temporal error {r.baseline['temporal_error']:.2f}: the model is "
        f"{'above' if r.psnr > r.baseline['psnr'] else 'BELOW'} it by {abs(r.psnr - r.baseline['psnr']):.2f} dB",
        f"  compression: latent {c['latent_shapes']} = {c['latent_elements']} elements = "
        f"{c['latent_over_pixel_elements']:.5f} of the {c['pixel_elements']} pixel elements (1/"
        f"{c['pixels_per_latent_element']:.0f}); {c['latent_bytes_per_clip']} bytes per clip as float16, "
        f"{c['latent_plus_side_bytes_per_clip']} with the {side} {c['side_shapes'][side]} (uint8)",
        f"  report {Path(r.output) / 'report.json'}; contact sheet {Path(r.output) / 'contact_sheet.png'}",
    ]
    return "\n".join(lines)


def progress(spec: EvalAESpec) -> str:
    return "done" if (Path(spec.output) / "report.json").exists() else "not started"

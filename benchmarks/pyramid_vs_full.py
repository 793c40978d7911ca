"""Pyramidal vs full flow matching: step time and tokens per step of the same DiT on the same batch, in one run; the
same training step under FSDP2 on 1 and on 2 ranks; and with activation checkpointing off and on (step time and the
step's peak memory above what the process held before it, each in a fresh process).

    python benchmarks/pyramid_vs_full.py                                   # tiny keyframe model, CPU, fp32
    python benchmarks/pyramid_vs_full.py --preset motion-tiny --frames 8 --size 8
    python benchmarks/pyramid_vs_full.py --preset keyframe-paper --size 256 --batch 8 --device cuda --bf16 --no-fsdp

A step is what `hpcvid train` does per micro-batch: draw the flow's training pairs (the pyramid splits the batch over
its stages), run the model on each, MSE on the velocity, backward, AdamW. The two flows alternate in rounds and each
keeps its best round, since this machine's noise is as large as some effects. The goal of the pyramid is a step-time
ratio near its token ratio (0.4375 for 3 stages). Writes JSON (benchmarks/results/pyramid_vs_full.json) and a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpcvid.flow import make_flow, text_dropout_mask  # noqa: E402
from hpcvid.models.dit import DIT_PRESETS, DiT, MotionCond  # noqa: E402

TEXT_TOKENS = 24      # a caption's tokens (MiniLM on the quickstart captions: 24-26)


def batch_for(model, args, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """Random inputs of the shapes training sees: x1, text states, mask, conditioning."""
    cfg, g = model.config, torch.Generator().manual_seed(0)
    if cfg.kind == "keyframe":
        x1 = torch.rand(args.batch, 3, args.frames, args.size, args.size, generator=g) * 2 - 1
        cond = None
    else:
        clips = max(1, args.frames // cfg.frames_per_clip)
        x1 = torch.randn(args.batch, cfg.in_channels, clips * cfg.frames_per_clip, args.size, args.size, generator=g)
        pixels = args.size * cfg.content_scale
        cond = MotionCond(torch.rand(args.batch, 3, clips, pixels, pixels, generator=g).to(device) * 2 - 1)
    text = torch.randn(args.batch, TEXT_TOKENS, cfg.text_dim, generator=g)
    return x1.to(device), text.to(device), torch.ones(args.batch, TEXT_TOKENS, dtype=torch.bool, device=device), cond


def make_step(model, opt, flow, batch, device, bf16: bool):
    x1, text, mask, cond = batch
    B = x1.shape[0]
    patch = getattr(model, "module", model).config.patch_size

    def step(seed: int) -> int:
        g = torch.Generator().manual_seed(seed)
        m = mask & ~text_dropout_mask(B, 0.1, g, device)[:, None]
        opt.zero_grad(set_to_none=True)
        tokens, total = 0, x1.new_zeros(())
        for sb in flow.training_batches(x1, g):
            idx = sb.index
            sub = None if cond is None else MotionCond(cond.frames[idx])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                v = model(sb.x_t, sb.t, text[idx], m[idx], sub, spatial_factor=sb.factor)
            total = total + (v.float() - sb.target).pow(2).mean() * (len(idx) / B)
            T, H, W = sb.x_t.shape[2:]
            tokens += len(idx) * T * (H // patch) * (W // patch)
        total.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return tokens

    return step


def time_steps(step, steps: int, seed: int = 0) -> tuple[float, int]:
    step(seed)                                                   # warm-up: allocations, kernel choices
    start = time.perf_counter()
    tokens = 0
    for i in range(steps):
        tokens = step(seed + 1 + i)
    return (time.perf_counter() - start) / steps, tokens


def single(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = DiT(DIT_PRESETS[args.preset]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = batch_for(model, args, device)
    flows = {kind: make_flow(kind) for kind in ("pyramidal", "full")}
    steps = {kind: make_step(model, opt, flow, batch, device, args.bf16) for kind, flow in flows.items()}
    best: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for _ in range(args.rounds):
        for kind, step in steps.items():
            seconds, n = time_steps(step, args.steps)
            best[kind] = min(best.get(kind, float("inf")), seconds)
            tokens[kind] = n
    params = model.num_params()
    peak_flops = {kind: 6 * params * tokens[kind] / best[kind] for kind in best}
    return {"step_seconds": {k: round(v, 5) for k, v in best.items()}, "tokens_per_step": tokens,
            "step_time_ratio": round(best["pyramidal"] / best["full"], 4),
            "token_ratio": round(tokens["pyramidal"] / tokens["full"], 4),
            "achieved_tflops": {k: round(v / 1e12, 5) for k, v in peak_flops.items()}, "parameters": params}


def fsdp_worker(args) -> None:
    """Run under mpiexec: one training step loop with FSDP2 over torch.distributed; rank 0 prints a JSON line."""
    from hpcvid.dist import Env, destroy_torch_distributed, init_torch_distributed, make_comm
    from hpcvid.parallel.fsdp import parallelize

    env = Env.discover()
    comm = make_comm(env)
    device = torch.device(args.device)
    init_torch_distributed(env, comm, backend="nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    model = parallelize(DiT(DIT_PRESETS[args.preset]).to(device), "fsdp2", device, mixed_precision=args.bf16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = make_step(model, opt, make_flow("pyramidal"), batch_for(_config_only(args.preset), args, device), device,
                     args.bf16)
    best = min(time_steps(step, args.steps, seed=env.rank * 1000)[0] for _ in range(args.rounds))
    times = comm.all_gather(best)
    if env.is_main:
        print(json.dumps({"ranks": env.world_size, "step_seconds": round(max(times), 5),
                          "samples_per_s": round(env.world_size * args.batch / max(times), 3)}), flush=True)
    destroy_torch_distributed(comm)
    comm.close()


def recompute_worker(args) -> None:
    """One process, one setting of activation checkpointing: best pyramidal step time and the first step's peak
    memory above what was held before it (CUDA: peak allocated; CPU: peak resident set, read after the first step
    only, since the C allocator keeps freed memory and later steps' peaks would pile up). Prints JSON."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = DiT(DIT_PRESETS[args.preset]).to(device)
    model.recompute_blocks = args.recompute_worker == "on"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = make_step(model, opt, make_flow("pyramidal"), batch_for(model, args, device), device, args.bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _status_bytes("VmRSS")
    step(0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status_bytes("VmHWM")     # not ru_maxrss: it carries the parent's peak across fork and exec
    seconds = min(time_steps(step, args.steps)[0] for _ in range(args.rounds))
    print(json.dumps({"step_seconds": round(seconds, 5), "peak_step_mib": round((peak - before) / 2**20, 1)}),
          flush=True)


def _status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024                                 # reported in kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def recompute_comparison(args) -> dict:
    out = {}
    for setting in ("off", "on"):
        cmd = [sys.executable, __file__, "--recompute-worker", setting, "--preset", args.preset, "--frames",
               str(args.frames), "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
               "--rounds", str(args.rounds), "--device", args.device] + (["--bf16"] if args.bf16 else [])
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("{")), None)
        if line is None:
            raise RuntimeError(f"activation checkpointing {setting}: worker failed:\n{res.stderr[-2000:]}")
        out[setting] = json.loads(line)
    out["step_time_on_over_off"] = round(out["on"]["step_seconds"] / out["off"]["step_seconds"], 3)
    out["peak_memory_on_over_off"] = round(out["on"]["peak_step_mib"] / max(out["off"]["peak_step_mib"], 0.1), 3)
    return out


def _config_only(preset: str):
    """A stand-in carrying only the config, for batch_for (the real model is sharded)."""
    return type("ConfigOnly", (), {"config": DIT_PRESETS[preset]})()


def fsdp_scaling(args) -> dict:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    out = {}
    for ranks in (1, 2):
        cmd = [str(mpiexec), "-n", str(ranks), sys.executable, __file__, "--fsdp-worker", "--preset", args.preset,
               "--frames", str(args.frames), "--size", str(args.size), "--batch", str(args.batch), "--steps",
               str(args.steps), "--rounds", str(args.rounds), "--device", args.device]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                             env={"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
                                  "PYTHONPATH": str(ROOT)})
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("{")), None)
        if line is None:
            raise RuntimeError(f"FSDP2 worker on {ranks} rank(s) failed:\n{res.stderr[-2000:]}")
        out[f"ranks_{ranks}"] = json.loads(line)
    out["throughput_2_over_1"] = round(out["ranks_2"]["samples_per_s"] / out["ranks_1"]["samples_per_s"], 3)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="keyframe-tiny", choices=sorted(DIT_PRESETS))
    parser.add_argument("--frames", type=int, default=4, help="keyframes (keyframe) or latent frames (motion)")
    parser.add_argument("--size", type=int, default=128, help="full spatial size: pixels (keyframe), latent (motion)")
    parser.add_argument("--batch", type=int, default=6, help="samples per rank per step (a multiple of 3 splits evenly)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-fsdp", action="store_true", help="skip the 1 vs 2 rank FSDP2 part")
    parser.add_argument("--no-recompute", action="store_true", help="skip the activation checkpointing part")
    parser.add_argument("--fsdp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recompute-worker", choices=["off", "on"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pyramid_vs_full.json")
    args = parser.parse_args(argv)
    if args.fsdp_worker:
        fsdp_worker(args)
        return 0
    if args.recompute_worker:
        recompute_worker(args)
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = {"benchmark": "pyramid_vs_full", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": args.device,
                          "threads": torch.get_num_threads(), "bf16": args.bf16},
              "config": {k: getattr(args, k) for k in ("preset", "frames", "size", "batch", "steps", "rounds")},
              "single_process": single(args)}
    if not args.no_fsdp:
        report["fsdp2_pyramidal"] = fsdp_scaling(args)
    if not args.no_recompute:
        report["activation_checkpointing"] = recompute_comparison(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    s = report["single_process"]
    print(f"{args.preset}, batch {args.batch}, {args.frames}x{args.size}x{args.size}, {args.device}"
          f"{' bf16' if args.bf16 else ''}:")
    for kind in ("pyramidal", "full"):
        print(f"  {kind:9s} {s['step_seconds'][kind]:.4f} s/step  {s['tokens_per_step'][kind]:6d} tokens/step  "
              f"{s['achieved_tflops'][kind]:.4f} TFLOP/s (6 N tokens)")
    print(f"  pyramidal / full: step time {s['step_time_ratio']:.3f}, tokens {s['token_ratio']:.3f}")
    if "fsdp2_pyramidal" in report:
        f = report["fsdp2_pyramidal"]
        print(f"  FSDP2 (pyramidal): 1 rank {f['ranks_1']['step_seconds']:.4f} s/step, 2 ranks "
              f"{f['ranks_2']['step_seconds']:.4f} s/step; samples/s 2 vs 1 ranks: {f['throughput_2_over_1']:.3f}")
    if "activation_checkpointing" in report:
        a = report["activation_checkpointing"]
        print(f"  activation checkpointing (pyramidal): step time on/off {a['step_time_on_over_off']:.3f}, "
              f"step peak memory {a['on']['peak_step_mib']:.0f} vs {a['off']['peak_step_mib']:.0f} MiB "
              f"({a['peak_memory_on_over_off']:.3f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

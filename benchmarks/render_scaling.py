"""Clip-parallel rendering: speed on 1 and 2 ranks, communication, memory per rank as videos grow, and seams,
against the sequential sliding-window baseline, all with the real `hpcvid render` command under mpiexec.

    make quickstart                                      # trains the tiny models this uses by default
    python benchmarks/render_scaling.py                  # CPU: 32-clip videos, memory at 16 clips per rank
    python benchmarks/render_scaling.py --clips 144 --per-rank 72 --ranks 1 2 4 8 --job jobs/tiny_render.yaml

Measured, each render into a fresh folder (the figures come from each video's report.json):
  speed        frames/s of the same video: parallel on 1 rank, on 2 ranks (parallel efficiency = fps_2 / (2 fps_1)),
               and the sequential baseline on 1 rank
  comm share   seconds ranks spent in the dual-scope exchanges / their busy seconds (2 ranks)
  memory       peak resident memory per rank with a fixed number of clips per rank while the video grows with the
               rank count (1x, 2x, 4x, 8x): flat is the goal
  seams        mean frame-to-frame change across clip (and rank) boundaries / within clips, parallel vs sequential
Ranks beyond the cores share them, which slows the big runs but does not change memory per rank.
Writes benchmarks/results/render_scaling.json and render_scaling.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def render(args, output: Path, ranks: int, clips: int, mode: str = "parallel") -> dict:
    """One `hpcvid render` of the job's prompt; returns the video's report."""
    cmd = [sys.executable, "-m", "hpcvid.cli", "render", str(args.job), "--set", f"render.output={output}",
           "--set", f"render.clips={clips}", "--set", f"render.mode={mode}", "--set", "render.progress=false",
           "--set", f"render.steps={args.steps}", "--set", f"render.torch_threads={args.threads}"]
    if ranks > 1 or mode == "parallel":
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "SLURM_", "HYDRA_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"render_scaling: {' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    [report] = [json.loads(p.read_text()) for p in output.glob("*/report.json")]
    print(f"  {mode:10s} {ranks} rank(s) {clips:4d} clips: {report['frames']:5d} frames in {report['seconds']:7.1f} s "
          f"= {report['frames_per_second']:6.1f} frames/s, peak {max(r['peak_memory_mb'] for r in report['per_rank']):.0f} "
          f"MB/rank, comm {100 * report['communication_share']:.1f}%", flush=True)
    return report


def summary(report: dict) -> dict:
    return {"frames": report["frames"], "seconds": report["seconds"], "frames_per_second": report["frames_per_second"],
            "communication_share": report["communication_share"],
            "communication_bytes_per_rank": [r["communication_bytes"] for r in report["per_rank"]],
            "peak_memory_mb_per_rank": [r["peak_memory_mb"] for r in report["per_rank"]],
            "phase_seconds_per_rank": [{k: v["seconds"] for k, v in r["phases"].items()} for r in report["per_rank"]],
            "seam_ratio": report["seams"]["seam_ratio"], "change_across_ranks": report["seams"]["change_across_ranks"],
            "change_within_clips": report["seams"]["change_within_clips"]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    runs = result["speed"]
    names = list(runs)
    speed.bar(names, [runs[n]["frames_per_second"] for n in names], color=["#888", "#4a7", "#27a"])
    speed.set_ylabel("frames / s")
    speed.set_title(f"{result['clips']} clips; parallel efficiency {result['parallel_efficiency']:.2f}")
    mem = result["memory"]
    totals = [m["clips"] for m in mem]
    memory.plot(totals, [max(m["peak_memory_mb_per_rank"]) for m in mem], "o-", label="max over ranks")
    memory.plot(totals, [min(m["peak_memory_mb_per_rank"]) for m in mem], "o--", label="min over ranks")
    memory.set_xscale("log", base=2)
    memory.set_xlabel(f"clips in the video ({result['clips_per_rank']} per rank)")
    memory.set_ylabel("peak resident memory per rank (MB)")
    memory.set_ylim(bottom=0)
    memory.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, default=ROOT / "jobs" / "tiny_render.yaml")
    parser.add_argument("--clips", type=int, default=32, help="clips of the speed and seam video")
    parser.add_argument("--per-rank", type=int, default=16, help="clips per rank in the memory runs")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8], help="rank counts of the memory runs")
    parser.add_argument("--steps", type=int, default=10, help="Euler steps per pyramid stage")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank: 1 rank gets what each of "
                                                                  "the 2 ranks gets, so efficiency means scaling")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="render_scaling."))
    try:
        print(f"speed and seams, {args.clips} clips:", flush=True)
        seq = render(args, work / "seq", 1, args.clips, "sequential")
        one = render(args, work / "par1", 1, args.clips)
        two = render(args, work / "par2", 2, args.clips)
        print(f"memory, {args.per_rank} clips per rank:", flush=True)
        memory = [{"ranks": n, "clips": n * args.per_rank,
                   **summary(render(args, work / f"mem{n}", n, n * args.per_rank))} for n in args.ranks]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peaks = [max(m["peak_memory_mb_per_rank"]) for m in memory]
    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "job": str(args.job.relative_to(ROOT) if args.job.is_relative_to(ROOT) else args.job), "steps": args.steps,
        "torch_threads_per_rank": args.threads,
        "clips": args.clips, "clips_per_rank": args.per_rank,
        "speed": {"sequential_1_rank": summary(seq), "parallel_1_rank": summary(one), "parallel_2_ranks": summary(two)},
        "parallel_efficiency": round(two["frames_per_second"] / (2 * one["frames_per_second"]), 3),
        "speedup_2_ranks_vs_sequential": round(two["frames_per_second"] / seq["frames_per_second"], 3),
        "speedup_1_rank_vs_sequential": round(one["frames_per_second"] / seq["frames_per_second"], 3),
        "communication_share_2_ranks": two["communication_share"],
        "memory": memory,
        "memory_growth_largest_vs_smallest": round(peaks[-1] / peaks[0], 3),
        "seam_ratio": {"sequential": seq["seams"]["seam_ratio"], "parallel_1_rank": one["seams"]["seam_ratio"],
                       "parallel_2_ranks": two["seams"]["seam_ratio"]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "render_scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "render_scaling.png")
    print(json.dumps({k: result[k] for k in ("parallel_efficiency", "speedup_2_ranks_vs_sequential",
                                              "communication_share_2_ranks", "memory_growth_largest_vs_smallest",
                                              "seam_ratio")}, indent=1))
    print(f"wrote {args.out / 'render_scaling.json'} and {args.out / 'render_scaling.png'}")


if __name__ == "__main__":
    main()

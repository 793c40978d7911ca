"""Clip-parallel rendering over real MPI ranks: dual-scope attention across 2 ranks against its single-process
statement, and the render stage end to end (mpiexec, segments, join read back with PyAV, resume, prompt files)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))      # helpers, also under --import-mode=importlib
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest's child_env
from clip_parallel_worker import CASES, RUNS, T  # noqa: E402
from conftest import child_env  # noqa: E402
from dit_helpers import train_job  # noqa: E402
from dual_scope_reference import reference_dual_scope  # noqa: E402
from prep_helpers import assert_cli_ok  # noqa: E402

from hpcvid.models.layers import Attention  # noqa: E402

WORKER = Path(__file__).with_name("clip_parallel_worker.py")


@pytest.mark.parametrize("backend", ["mpi", "torch"])
def test_dual_scope_over_two_ranks_equals_the_single_process_statement(tmp_path, mpiexec, backend):
    res = subprocess.run([str(mpiexec), "-n", "2", sys.executable, str(WORKER), backend, str(tmp_path)],
                         env=child_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)                                    # the worker's weights and sequence
    att = Attention(16, heads=2, head_dim=8)
    seq = torch.randn(5, sum(RUNS), 16)
    for name, (scope, t) in CASES.items():
        got = torch.cat([ranks[0][name], ranks[1][name]], dim=1)             # (R, N, C)
        with torch.no_grad():
            want = reference_dual_scope(att, seq, RUNS, scope.local_frames, scope.global_frames, scope.bias,
                                        scope.global_until, t, window=T, length_scaling=scope.length_scaling)
        assert torch.allclose(got, want, atol=1e-5), name
    with torch.no_grad():                                   # p covers everything, no global frames: full attention
        assert torch.allclose(torch.cat([ranks[0]["everything"], ranks[1]["everything"]], dim=1), att(seq),
                              atol=1e-5)
    for rank in ranks:                                      # bytes per call do not grow with the video
        assert rank["bytes_x1"] == rank["bytes_x2"] > 0


# ---------------------------------------------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def models(dit_dataset, tmp_path_factory, run_cli):
    """Tiny keyframe and motion DiTs (2 steps: plumbing, not quality) on a real latent dataset, and its Reducio."""
    root = tmp_path_factory.mktemp("render-models")
    for kind in ("keyframe", "motion"):
        job = train_job(root / f"{kind}.yaml", dit_dataset, root / kind, kind=kind, steps=2)
        assert_cli_ok(run_cli(["train", job]))
    return {**dit_dataset, "root": root}


def render_job(path: Path, models: dict, output: Path, **changes) -> Path:
    section = {"keyframe": str(models["root"] / "keyframe"), "motion": str(models["root"] / "motion"),
               "autoencoder": str(models["ae"]), "output": str(output), "clips": 8, "segment_clips": 2, "steps": 2,
               "keyframe_scope": {"local_frames": 2, "global_frames": 4},
               "motion_scope": {"local_frames": 4, "global_frames": 4},
               "text": {"encoder": "minilm", "max_tokens": 32}, "progress": False, "torch_threads": 1, **changes}
    path.write_text(yaml.safe_dump({"render": section}, sort_keys=False))
    return path


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def only_video(output: Path) -> Path:
    folders = [f for f in output.iterdir() if f.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def test_two_ranks_render_the_requested_length_and_join_it_exactly(tmp_path, models, run_cli, mpiexec):
    job = render_job(tmp_path / "job.yaml", models, tmp_path / "out")
    res = run_cli(["render", job], launcher=[mpiexec, "-n", "2"])
    assert_cli_ok(res)
    folder = only_video(tmp_path / "out")
    frames = decoded(folder / "video.mp4")
    assert len(frames) == 8 * 16 and frames[0].shape == (64, 64, 3)
    segments = sorted((folder / "segments").glob("*.mp4"))
    assert [p.name for p in segments] == ["000000-000002.mp4", "000002-000004.mp4", "000004-000006.mp4",
                                          "000006-000008.mp4"]
    pieces = [f for p in segments for f in decoded(p)]
    assert all(np.array_equal(a, b) for a, b in zip(frames, pieces))     # packets copied, not re-encoded
    report = json.loads((folder / "report.json").read_text())
    assert report["frames"] == 128 and report["ranks"] == 2 and report["runs"] == [[0, 4], [4, 8]]
    for rank in report["per_rank"]:
        assert rank["communication_bytes"] > 0 and rank["peak_memory_mb"] > 0 and rank["segments_rendered"] == 2
    seams = report["seams"]          # (2-step models barely move within a clip: the ratio itself may be undefined)
    assert seams["frames"] == 128 and seams["change_across_ranks"] is not None
    assert (folder / "sheet.png").stat().st_size > 1000
    assert str(folder / "video.mp4") in res.stdout and "report.json" in res.stdout


def rank_pid(job: Path, rank: int) -> int | None:
    """The pid of `rank` of an mpiexec-launched hpcvid command on `job` (from /proc: its cmdline and PMI_RANK)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if str(job).encode() in cmdline and b"hpcvid.cli" in cmdline:
                environ = (proc / "environ").read_bytes().split(b"\0")
                if f"PMI_RANK={rank}".encode() in environ:
                    return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def test_a_killed_rank_is_finished_by_a_rerun_that_redoes_nothing_complete(tmp_path, models, run_cli, mpiexec):
    job = render_job(tmp_path / "job.yaml", models, tmp_path / "out", clips=16, segment_clips=1)
    proc = run_cli.popen(["render", job], launcher=[mpiexec, "-n", "2"])
    deadline, killed = time.time() + 180, False
    while time.time() < deadline and proc.poll() is None:
        if list((tmp_path / "out").glob("*/motion/000000-*.npy")):     # rank 0 finished its motion: rank 1 is busy
            pid = rank_pid(job, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    proc.communicate(timeout=120)
    assert killed and proc.returncode != 0
    folder = only_video(tmp_path / "out")
    assert not (folder / "video.mp4").exists()
    def files(pattern):
        return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.glob(pattern)}

    before, made = files("segments/*.mp4"), files("*/*.npy")
    assert made                                             # keyframes and rank 0's motion survived the kill
    res = run_cli(["render", job], launcher=[mpiexec, "-n", "2"])
    assert_cli_ok(res)
    after = files("segments/*.mp4")
    assert len(after) == 16 and all(after[name] == mtime for name, mtime in before.items())
    assert all(files("*/*.npy")[name] == mtime for name, mtime in made.items())   # kept, not rewritten
    report = json.loads((folder / "report.json").read_text())
    assert report["resumed"] and report["per_rank"][0]["phases"]["keyframes"]["source"] == "kept"
    assert sum(r["segments_rendered"] for r in report["per_rank"]) == 16 - len(before)
    assert sum(r["segments_kept"] for r in report["per_rank"]) == len(before)
    assert len(decoded(folder / "video.mp4")) == 16 * 16


def test_prompt_files_arrive_verbatim_and_split_over_array_tasks(tmp_path, models, run_cli):
    tricky = 'a "red" square: it moves\nright, ünïcode — 🎬 $(rm -rf ~) \'quoted\''
    lines = [json.dumps(tricky), json.dumps({"segments": ["first part", "second: part"], "name": "story", "seed": 3})]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    job = render_job(tmp_path / "job.yaml", models, tmp_path / "out", clips=2, segment_clips=1)
    for task in (0, 1):
        res = run_cli(["render", job, "--prompts", prompts],
                      env={"HPCVID_ARRAY_TASK_ID": str(task), "HPCVID_ARRAY_TASK_COUNT": "2"})
        assert_cli_ok(res)
        assert len([f for f in (tmp_path / "out").iterdir() if f.is_dir()]) == task + 1   # one video per task
    first = json.loads(next((tmp_path / "out").glob("0000-*/report.json")).read_text())
    assert first["prompts"] == [tricky] and first["frames"] == 32
    story = json.loads((tmp_path / "out" / "story" / "report.json").read_text())
    assert story["prompts"] == ["first part", "second: part"] and story["settings"]["seed"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{"prompt": "x", "colour": 1}\n')
    res = run_cli(["render", job, "--prompts", bad])
    assert res.returncode == 2 and f"{bad} line 2: unknown key 'colour'" in res.stderr


def test_image_to_video_sequential_baseline_and_a_changed_render(tmp_path, models, run_cli):
    from PIL import Image

    picture = np.zeros((80, 96, 3), np.uint8)
    picture[:, :48] = (250, 20, 20)
    Image.fromarray(picture).save(tmp_path / "first.png")
    job = render_job(tmp_path / "job.yaml", models, tmp_path / "out", clips=4, segment_clips=2, mode="sequential",
                     image=str(tmp_path / "first.png"))
    assert_cli_ok(run_cli(["render", job]))
    folder = only_video(tmp_path / "out")
    keyframes = np.load(next((folder / "keyframes").glob("*.npy")))
    from hpcvid.data.video import resize_center_crop

    want = resize_center_crop(picture[None], (64, 64))[0].astype(np.float32) / 127.5 - 1
    assert np.allclose(keyframes[0].transpose(1, 2, 0), want, atol=1e-5)   # the image is the first keyframe
    report = json.loads((folder / "report.json").read_text())
    assert report["mode"] == "sequential" and report["frames"] == 64 and report["ranks"] == 1
    res = run_cli(["render", job, "--set", "render.seed=5"])
    assert res.returncode == 2 and "holds another render (seed: 0 there, 5 now)" in res.stderr


def test_the_render_stage_job_pickles(tmp_path, models):
    import pickle

    from hpcvid.config import load_job, to_dict
    from hpcvid.launch.job import StageJob
    from hpcvid.stages import get_stage

    spec = load_job(render_job(tmp_path / "job.yaml", models, tmp_path / "out")).render
    job = StageJob("render", to_dict(spec), str(tmp_path / "runs"))
    assert pickle.loads(pickle.dumps(job)).spec == job.spec
    assert get_stage("render").array and get_stage("render").comm == "mpi"

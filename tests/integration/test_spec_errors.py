"""Bad job files through the real CLI: `hpcvid check` and the stage command refuse each one the same way, before any
work: exit 2, exactly one stderr line naming the file and the key path, no traceback, nothing created.

Every case here was a traceback, a silent pass or a run that failed every row with exit 0 before spec checking
covered it. A refused stage never imports torch, so each run takes a fraction of a second.
"""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # conftest's child_env, also under importlib mode
from conftest import child_env  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GOOD = """\
prep:
  manifest: {{kind: folder, path: {videos}}}
  output: {out}
  text: {{encoder: none}}
"""


def good(tmp: Path) -> str:
    return GOOD.format(videos=tmp / "videos", out=tmp / "out")


def with_clip(tmp: Path, clip: str) -> str:
    return good(tmp) + clip


# id -> (job file text or bytes, made from the test's folder; key path the line must name ("" if none); words)
CASES = {
    "not_utf8": (lambda t: good(t).encode() + b"# caf\xe9\n", "", ["line 5", "byte offset", "not UTF-8"]),
    "empty_file": (lambda t: "", "", ["no stage section"]),
    "only_comments": (lambda t: "# a job file\n\n# with nothing in it\n", "", ["no stage section"]),
    "duplicate_top_level_key": (lambda t: good(t) + "prep:\n  output: x\n", "prep",
                                ["duplicate key at line 5", "first given at line 1"]),
    "duplicate_nested_key": (lambda t: with_clip(t, "  clip:\n    fps: 8\n    num_frames: 8\n    fps: 9\n"),
                             "prep.clip.fps", ["duplicate key at line 8", "first given at line 6"]),
    "fps_nan": (lambda t: with_clip(t, "  clip: {fps: .nan}\n"), "prep.clip.fps", ["finite", ".nan"]),
    "fps_inf": (lambda t: with_clip(t, "  clip: {fps: .inf}\n"), "prep.clip.fps", ["finite", ".inf"]),
    "num_frames_huge": (lambda t: with_clip(t, "  clip: {num_frames: 9999999999}\n"), "prep.clip.num_frames",
                        ["must be <= 4096", "9999999999"]),
    "null_section": (lambda t: with_clip(t, "  clip: null\n"), "prep.clip",
                     ["expected a mapping (the clip: section), got null"]),
    "empty_section": (lambda t: with_clip(t, "  clip:\n"), "prep.clip",
                      ["expected a mapping (the clip: section), got null"]),
    "empty_stage_section": (lambda t: "prep:\n", "prep", ["expected a mapping (the prep: section), got null"]),
    "unknown_key": (lambda t: with_clip(t, "  clip: {num_frame: 8}\n"), "prep.clip.num_frame", ["unknown key"]),
    "missing_manifest": (lambda t: GOOD.format(videos=t / "nope", out=t / "out"), "prep.manifest.path",
                         ["no such folder of videos", "nope"]),
    "output_is_a_file": (lambda t: GOOD.format(videos=t / "videos", out=t / "a_file"), "prep.output",
                         ["existing file, not a folder"]),
    "output_parent_is_a_file": (lambda t: GOOD.format(videos=t / "videos", out=t / "a_file" / "out"), "prep.output",
                                ["cannot be created", "is a file, not a folder"]),
}


def assert_refused(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 and exactly one stderr line holding every needle, no traceback."""
    assert res.returncode == 2, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{res.stderr}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A videos folder (empty: only its existence is checked) and a regular file to trip over."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "a_file").write_text("not a folder\n")
    return tmp_path


def test_good_job_passes_check(folder, run_cli):
    job = folder / "job.yaml"
    job.write_text(good(folder))
    res = run_cli(["check", job])
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert not (folder / "out").exists()                     # checking creates nothing


@pytest.mark.parametrize("command", ["check", "prep"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_spec_is_one_line(folder, run_cli, case, command):
    make, key, words = CASES[case]
    job = folder / "job.yaml"
    content = make(folder)
    job.write_bytes(content if isinstance(content, bytes) else content.encode())
    where = f"{job}: {key}: " if key else f"{job}: "
    line = assert_refused(run_cli([command, job]), where, *words)
    assert line.startswith(f"hpcvid {command}: ")
    assert not (folder / "out").exists()


@pytest.mark.parametrize("command", ["check", "prep"])
def test_set_override_nan_is_refused(folder, run_cli, command):
    job = folder / "job.yaml"
    job.write_text(good(folder))
    assert_refused(run_cli([command, job, "--set", "prep.clip.fps=.nan"]), f"{job}: prep.clip.fps: ", "finite")
    assert_refused(run_cli([command, job, "--set", "prep.manifest.path=" + str(folder / "gone")]),
                   f"{job}: prep.manifest.path: ", "no such")


def test_other_stage_commands_refuse_at_start(folder, run_cli):
    """selftest, train-ae, eval-ae: the same checks on their own sections (and not on the others')."""
    job = folder / "job.yaml"
    job.write_text(f"selftest: {{output: {folder / 'a_file'}}}\n"
                   f"eval_ae:\n  checkpoint: {folder / 'no_run'}\n  data: {{manifest: {{kind: folder, path: "
                   f"{folder / 'videos'}}}}}\n  output: {folder / 'eval'}\n")
    assert_refused(run_cli(["selftest", job]), f"{job}: selftest.output: ", "existing file")
    assert_refused(run_cli(["eval-ae", job]), f"{job}: eval_ae.checkpoint: ",
                   "no such checkpoint or training output folder")
    assert_refused(run_cli(["train-ae", job]), f"{job}: train_ae: ", "no 'train_ae:' section")


def test_mpiexec_prints_once_and_every_rank_exits_2(folder, run_cli, mpiexec):
    job = folder / "job.yaml"
    job.write_text(with_clip(folder, "  clip: {fps: .nan}\n"))
    res = run_cli(["prep", job], launcher=[mpiexec, "-n", "2"], timeout=60)
    line = assert_refused(res, f"{job}: prep.clip.fps: ", "finite")
    assert "rank" not in line                                # both ranks saw it: said once, not per rank
    assert "Abort" not in res.stdout + res.stderr and "BAD TERMINATION" not in res.stdout + res.stderr


def test_stage_job_under_mpiexec_refuses_once(folder, mpiexec):
    """The launchers' path (StageJob, as --cluster processes runs it): same checks, one line, exit 2 on all ranks,
    and each rank's status file records what was wrong."""
    from hpcvid.launch.job import StageJob

    spec = {"manifest": {"kind": "folder", "path": str(folder / "nope")}, "output": str(folder / "out"),
            "text": {"encoder": "none"}}
    job = StageJob("prep", spec, str(folder / "run"), source=str(folder / "job.yaml"))
    pickled = folder / "job.pkl"
    pickled.write_bytes(pickle.dumps(job))
    res = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-m", "hpcvid.launch.job", str(pickled)],
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert_refused(res, f"hpcvid prep: {folder / 'job.yaml'}: prep.manifest.path: ", "no such folder")
    import json

    states = [json.loads(p.read_text()) for p in sorted((folder / "run" / "status" / "prep").glob("*.json"))]
    assert [s["rank"] for s in states] == [0, 1] and all(s["state"] == "FAILED" for s in states)
    assert all(s["error"].startswith("prep.manifest.path: no such folder") for s in states)


def test_error_inside_a_stage_names_the_job_file(folder, run_cli):
    """A user error found while the stage runs (here a CSV without a needed column) still names the job file."""
    csv = folder / "manifest.csv"
    csv.write_text("videoid,contentUrl,duration,page_dir\n1,u,3.0,p\n")
    job = folder / "job.yaml"
    job.write_text(f"prep:\n  manifest: {{kind: webvid, path: {csv}}}\n  output: {folder / 'out'}\n"
                   f"  text: {{encoder: none}}\n  progress: false\n")
    line = assert_refused(run_cli(["prep", job]), f"hpcvid prep: {job}: {csv}", "missing column 'name'")
    assert line.count(str(job)) == 1


def test_shipped_jobs_pass_check(run_cli):
    """Every job file in jobs/ is a valid spec. Their data paths are placeholders here (/datasets, the quickstart
    data made by `make quickstart`), so the paths are left to tests/unit/test_config.py, from a prepared folder."""
    jobs = [p for p in sorted((REPO / "jobs").glob("*.yaml")) if not p.name.startswith("pipeline_")]
    assert len(jobs) >= 9
    for path in jobs:
        res = run_cli(["check", "--spec-only", path])
        assert res.returncode == 0 and "ok" in res.stdout, f"{path}: {res.stderr}"

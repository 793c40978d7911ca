"""Shared by the launch tests: write a tiny two-stage pipeline (prep array -> selftest) into a folder."""
import json
import shutil
from pathlib import Path

import yaml


def write_pipeline(tmp_path: Path, videos: Path, *, array_tasks: int = 2, selftest_tasks: int = 2,
                   selftest: dict | None = None, stages: tuple[str, ...] = ("prep", "selftest")) -> Path:
    """prep (folder manifest, no text encoder: fast) as `array_tasks` tasks, then a selftest after it."""
    (tmp_path / "prep.yaml").write_text(yaml.safe_dump({"prep": {
        "manifest": {"kind": "folder", "path": str(videos)}, "output": str(tmp_path / "dataset"),
        "clip": {"num_frames": 8}, "buckets": [[32, 32], [32, 48]], "text": {"encoder": "none"},
        "shards": {"rows_per_shard": 2}, "decode_workers": 1, "progress": False}}))
    (tmp_path / "selftest.yaml").write_text(yaml.safe_dump({"selftest": {
        "output": str(tmp_path / "selftest"), "steps": 3, "step_seconds": 0.1, **(selftest or {})}}))
    entries = {
        "prep": {"job": str(tmp_path / "prep.yaml"),
                 "resources": {"array_tasks": array_tasks, "array_parallelism": 2, "time_min": 10}},
        "selftest": {"job": str(tmp_path / "selftest.yaml"), "after": ["prep"] if "prep" in stages else [],
                     "resources": {"tasks_per_node": selftest_tasks, "time_min": 10}},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"pipeline": {"name": "t", "run_dir": str(tmp_path / "runs"),
                                                 "stages": {k: entries[k] for k in stages}}}))
    return path


def run_dir_of(stdout: str) -> Path:
    line = next(l for l in stdout.splitlines() if l.startswith("run folder: "))
    return Path(line.split()[2])


def status_rows(run_cli, run_dir: Path) -> dict[str, dict]:
    out = run_cli(["status", run_dir, "--json"])
    assert out.returncode == 0, out.stderr
    return {row["stage"]: row for row in json.loads(out.stdout)}


def task_results(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "status" / stage).glob("*.json"))]


def copy_videos(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def quickstart_overrides(tmp_path: Path, videos: Path) -> list[str]:
    """Run the shipped jobs/pipeline_quickstart.yaml on `videos`, writing under tmp_path."""
    sets = [f"prep.manifest.path={videos}", f"prep.output={tmp_path / 'latents'}", "prep.progress=false"]
    return ["--set", f"pipeline.run_dir={tmp_path / 'runs'}", "--set", f"pipeline.stages.prep.set={json.dumps(sets)}"]

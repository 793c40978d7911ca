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
    """Run the shipped jobs/pipeline_quickstart.yaml (every stage) on `videos`, writing under tmp_path, with a
    4-step training budget (2 for the DiTs) so the test stays short."""
    ae = tmp_path / "ae"
    sets = {
        "prep": [f"prep.manifest.path={videos}", f"prep.output={tmp_path / 'latents'}", "prep.progress=false"],
        "train_ae": [f"train_ae.data.manifest.path={videos}", f"train_ae.output={ae}", "train_ae.steps=4",
                     "train_ae.checkpoint_every=4", "train_ae.log_every=2", "train_ae.progress=false"],
        "eval_ae": [f"eval_ae.data.manifest.path={videos}", f"eval_ae.checkpoint={ae}", f"eval_ae.output={ae / 'eval'}"],
        "prep_latents": [f"prep.manifest.path={videos}", f"prep.encoder.checkpoint={ae}",
                         f"prep.output={tmp_path / 'latents-reducio'}", "prep.progress=false"],
        **{f"train_{kind}": [f"train.data.shards={tmp_path / 'latents-reducio'}", f"train.output={tmp_path / kind}",
                             "train.steps=2", "train.checkpoint_every=2", "train.log_every=1", "train.batch_size=1",
                             "train.progress=false"] for kind in ("keyframe", "motion")},
        "sample": [f"sample.keyframe={tmp_path / 'keyframe'}", f"sample.motion={tmp_path / 'motion'}",
                   f"sample.autoencoder={ae}", f"sample.output={tmp_path / 'sample'}", "sample.steps=1"],
    }
    args = ["--set", f"pipeline.run_dir={tmp_path / 'runs'}"]
    for stage, items in sets.items():
        args += ["--set", f"pipeline.stages.{stage}.set={json.dumps(items)}"]
    return args


def check_quickstart_outputs(tmp_path: Path) -> None:
    """Every stage of the quickstart pipeline left its product."""
    for dataset in ("latents", "latents-reducio"):
        index = json.loads((tmp_path / dataset / "index.json").read_text())
        assert index["complete"] and index["totals"]["clips"] > 0, (dataset, index["totals"])
    assert json.loads((tmp_path / "latents-reducio" / "dataset.json").read_text())["encoder"]["kind"] == "reducio"
    report = json.loads((tmp_path / "ae" / "eval" / "report.json").read_text())
    assert report and (tmp_path / "ae" / "eval" / "contact_sheet.png").stat().st_size > 1000
    for kind in ("keyframe", "motion"):
        report = json.loads((tmp_path / kind / "train_report.json").read_text())
        assert report["steps"] == 2 and report["world_size"] == 2 and report["kind"] == kind
    assert json.loads((tmp_path / "sample" / "sample.json").read_text())["frames"] == 32

"""Run directories: submit a pipeline, then ask its state, cancel it, or retry what failed.

    runs/<name>-<YYYYmmdd-HHMMSS>/
      run.json                 the pipeline as submitted: each stage's frozen spec, resources and its tasks' job ids
      specs/<stage>.yaml       the same specs, for people
      logs/<stage>/<job id>/   submitit's stdout/stderr and pickles (or the local processes' logs)
      status/<stage>/task*.rank*.json   written by each task: RUNNING / COMPLETED / FAILED, error line, result

State comes from the scheduler for SLURM runs (one batched `sacct` call per refresh) and from the status files
otherwise; progress comes from each stage's own files (e.g. prep's shard markers).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from hpcvid.config import UserError, parse_spec, JobSpec
from hpcvid.io import atomic_write_bytes, atomic_write_json, read_json
from hpcvid.launch.executors import make_executor
from hpcvid.launch.job import StageJob
from hpcvid.launch.pipeline import PlannedStage, Resources, load_pipeline

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


# ---------------------------------------------------------------------------------------------------- submit

def submit_pipeline(path: str, cluster: str, only: Optional[list[str]] = None,
                    overrides: tuple[str, ...] = ()) -> Path:
    spec, planned = load_pipeline(path, overrides)
    if only:
        unknown = sorted(set(only) - {p.name for p in planned})
        if unknown:
            raise UserError(f"{path}: --only {unknown[0]}: not a stage of this pipeline "
                            f"(stages: {', '.join(p.name for p in planned)})")
        planned = [p for p in planned if p.name in only]
    run_dir = _new_run_dir(Path(spec.run_dir), spec.name)
    run = {"pipeline": spec.name, "source": str(path), "cluster": cluster, "created": time.time(), "cwd": os.getcwd(),
           "stages": {p.name: {"stage": p.stage, "after": [a for a in p.after if not only or a in only],
                               "spec": p.spec, "source": p.source, "resources": _plain(p.resources), "tasks": {}}
                      for p in planned}}
    (run_dir / "specs").mkdir()
    for p in planned:
        atomic_write_bytes(run_dir / "specs" / f"{p.name}.yaml", yaml.safe_dump({p.stage: p.spec}, sort_keys=False).encode())
    _save(run_dir, run)
    print(f"hpcvid submit: {spec.name} -> {run_dir} ({cluster})", flush=True)
    _submit_stages(run_dir, run, planned, {p.name: None for p in planned})
    return run_dir


def _new_run_dir(root: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        candidate = root / (f"{name}-{stamp}" + (f"-{n}" if n else ""))
        try:
            candidate.mkdir(parents=True)
            return candidate.resolve()
        except FileExistsError:
            continue
    raise UserError(f"{root}: cannot create a new run folder for {name}")


def _plain(obj: Any) -> Any:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(obj)))


def _save(run_dir: Path, run: dict) -> None:
    atomic_write_json(run_dir / "run.json", run)


def load_run(run_dir: str | Path) -> tuple[Path, dict]:
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    if run is None:
        raise UserError(f"{run_dir}: not an hpcvid run folder (no run.json)")
    return run_dir, run


def _planned(name: str, entry: dict) -> PlannedStage:
    resources = parse_spec(Resources, entry["resources"], "run.json", f"stages.{name}.resources")
    return PlannedStage(name, entry["stage"], entry["spec"], entry["after"], resources, entry["source"])


def _submit_stages(run_dir: Path, run: dict, planned: list[PlannedStage], todo: dict[str, Optional[list[str]]]) -> None:
    """Submit `todo` stages (name -> task keys to (re)submit, None = all) in order, chaining dependencies."""
    executor = make_executor(run["cluster"], run_dir / "logs")
    for stage in planned:
        if stage.name not in todo:
            continue
        entry = run["stages"][stage.name]
        states = task_states(run_dir, run) if executor.blocking else {}
        blocked = [d for d in entry["after"] if executor.blocking and _stage_state(states.get(d, {})) != "COMPLETED"]
        if blocked:
            print(f"hpcvid submit: {stage.name}: not run, {', '.join(blocked)} did not complete", flush=True)
            continue
        after = sorted({_base_id(t["job_id"]) for d in entry["after"] for t in run["stages"][d]["tasks"].values()
                        if not executor.blocking and _is_active(t)})
        count = stage.resources.array_tasks
        keys = todo[stage.name] or (["job"] if count == 1 else [str(i) for i in range(count)])
        jobs = [StageJob(stage.stage, stage.spec, str(run_dir), None if k == "job" else int(k),
                         None if k == "job" else count, stage.source, run["cwd"], stage.name) for k in keys]
        for key in keys:   # visible to `hpcvid status` while a blocking stage runs
            entry["tasks"][key] = {"job_id": "submitting", "attempt": entry["tasks"].get(key, {}).get("attempt", 0) + 1}
        _save(run_dir, run)
        ids = executor.submit(stage, jobs, after)
        for key, job_id in zip(keys, ids):
            entry["tasks"][key]["job_id"] = job_id
        _save(run_dir, run)
        print(f"hpcvid submit: {stage.name}: {len(ids)} task(s) {', '.join(ids[:4])}"
              f"{' ...' if len(ids) > 4 else ''}{' after ' + ','.join(after) if after else ''}", flush=True)


def _base_id(job_id: str) -> str:
    return job_id.split("_")[0]


def _is_active(task: dict) -> bool:
    return task.get("state", "PENDING") in ACTIVE   # filled in by retry from sacct; fresh submissions are pending


# ---------------------------------------------------------------------------------------------------- states

def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """State per job id (array tasks as '<id>_<i>') from ONE sacct call; pending array ranges are expanded."""
    ids = sorted({_base_id(j) for j in job_ids if re.fullmatch(r"\d+(_\d+)?", j)})
    if not ids:
        return {}
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise UserError(f"sacct failed ({out.returncode}): {out.stderr.strip().splitlines()[-1:] or ''}")
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.partition("|")
        state = state.split()[0] if state.strip() else "UNKNOWN"
        match = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job)
        if match:
            for part in match.group(2).split(","):
                lo, _, hi = part.partition("-")
                for i in range(int(lo), int(hi or lo) + 1):
                    states[f"{match.group(1)}_{i}"] = state
        else:
            states[job] = state
    return states


def _status_files(run_dir: Path, stage: str, key: str) -> list[dict]:
    task = "job" if key == "job" else f"task{int(key):04d}"
    return [s for s in (read_json(p) for p in sorted((run_dir / "status" / stage).glob(f"{task}.rank*.json"))) if s]


def task_states(run_dir: Path, run: dict) -> dict[str, dict[str, str]]:
    """{stage: {task key: state}}: sacct for SLURM runs, else the tasks' own status files."""
    scheduler = {}
    if run["cluster"] == "slurm":
        scheduler = sacct_states([t["job_id"] for e in run["stages"].values() for t in e["tasks"].values()])
    result: dict[str, dict[str, str]] = {}
    for name, entry in run["stages"].items():
        result[name] = {}
        for key, task in entry["tasks"].items():
            files = _status_files(run_dir, name, key)
            own = "FAILED" if any(f["state"] == "FAILED" for f in files) else (
                files[0]["state"] if files and all(f["state"] == files[0]["state"] for f in files) else
                ("RUNNING" if files else "PENDING"))
            result[name][key] = scheduler.get(task["job_id"], own) if run["cluster"] == "slurm" else own
    return result


def _stage_state(states: dict[str, str]) -> str:
    if not states:
        return "NOT_SUBMITTED"
    values = set(states.values())
    if values == {"COMPLETED"}:
        return "COMPLETED"
    for state in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "PREEMPTED"):
        if state in values:
            return state
    return "RUNNING" if "RUNNING" in values else sorted(values)[0]


# ---------------------------------------------------------------------------------------------------- status

def status_rows(run_dir: str | Path) -> list[dict[str, str]]:
    run_dir, run = load_run(run_dir)
    states = task_states(run_dir, run)
    rows = []
    for name, entry in run["stages"].items():
        counts: dict[str, int] = {}
        for state in states[name].values():
            counts[state] = counts.get(state, 0) + 1
        ids = sorted({_base_id(t["job_id"]) for t in entry["tasks"].values()})
        rows.append({"stage": name, "jobs": ",".join(ids) or "-", "state": _stage_state(states[name]),
                     "tasks": " ".join(f"{s}:{n}" for s, n in sorted(counts.items())) or "-",
                     "progress": _progress(entry), "error": _last_error(run_dir, name, entry, states[name])})
    return rows


def _progress(entry: dict) -> str:
    from hpcvid.stages import get_stage

    module = get_stage(entry["stage"]).load()
    if not hasattr(module, "progress"):
        return ""
    try:
        spec = parse_spec(JobSpec, {entry["stage"]: entry["spec"]}, "run.json").stage(entry["stage"])
        return module.progress(spec)
    except Exception as e:   # noqa: BLE001 - a status table must not die on one stage's files
        return f"? ({type(e).__name__})"


def _last_error(run_dir: Path, name: str, entry: dict, states: dict[str, str]) -> str:
    for key, task in entry["tasks"].items():
        for status in _status_files(run_dir, name, key):
            if status["state"] == "FAILED":
                return f"task {key}: {status.get('error', '')}"[:160]
        if states.get(key) not in (None, "COMPLETED", *ACTIVE):
            logs = sorted((run_dir / "logs" / name).glob(f"{task['job_id']}*/*.err")) + \
                sorted((run_dir / "logs" / name).glob(f"*/{task['job_id']}_*.err"))
            for log in logs:
                lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
                if lines:
                    return f"task {key}: {lines[-1].strip()}"[:160]
    return ""


def format_status(rows: list[dict[str, str]]) -> str:
    headers = ["stage", "jobs", "state", "tasks", "progress", "error"]
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) if rows else len(h) for h in headers}
    lines = ["  ".join(h.upper().ljust(widths[h]) for h in headers)]
    lines += ["  ".join(r[h].ljust(widths[h]) for h in headers).rstrip() for r in rows]
    return "\n".join(lines)


def watch(run_dir: str | Path, until_done: bool = True, max_interval_s: float = 60.0) -> list[dict[str, str]]:
    """Print the table, refreshing with a backoff (2 s doubling to max_interval_s): one sacct call per refresh."""
    interval = 2.0
    while True:
        rows = status_rows(run_dir)
        print(format_status(rows) + "\n", flush=True)
        if until_done and all(r["state"] not in ACTIVE and r["state"] != "NOT_SUBMITTED" for r in rows):
            return rows
        time.sleep(interval)
        interval = min(interval * 2, max_interval_s)


# ---------------------------------------------------------------------------------------------------- cancel, retry

def cancel(run_dir: str | Path) -> int:
    run_dir, run = load_run(run_dir)
    states = task_states(run_dir, run)
    active = [(name, key, task) for name, entry in run["stages"].items() for key, task in entry["tasks"].items()
              if states[name].get(key) in ACTIVE]
    if run["cluster"] == "slurm":
        ids = sorted({_base_id(task["job_id"]) for _, _, task in active})
        if ids:
            subprocess.run(["scancel", *ids], check=False)
        return len(ids)
    killed = 0
    for name, key, _ in active:     # local runs: signal the processes the status files name
        for status in _status_files(run_dir, name, key):
            try:
                os.kill(int(status["pid"]), signal.SIGTERM)
                killed += 1
            except (ProcessLookupError, PermissionError, KeyError, ValueError):
                pass
    return killed


def retry(run_dir: str | Path) -> dict[str, list[str]]:
    """Resubmit only the tasks that did not complete, and every later stage that has not completed."""
    run_dir, run = load_run(run_dir)
    states = task_states(run_dir, run)
    for name, entry in run["stages"].items():
        for key, task in entry["tasks"].items():
            task["state"] = states[name].get(key, "PENDING")
    planned = [_planned(name, entry) for name, entry in run["stages"].items()]
    todo: dict[str, Optional[list[str]]] = {}
    for stage in planned:
        entry = run["stages"][stage.name]
        failed = [k for k, t in entry["tasks"].items() if t["state"] not in ("COMPLETED", *ACTIVE)]
        never = not entry["tasks"]
        upstream = any(d in todo for d in entry["after"])
        if failed or never or (upstream and any(t["state"] != "COMPLETED" for t in entry["tasks"].values())):
            todo[stage.name] = None if never else (failed or [k for k, t in entry["tasks"].items()
                                                              if t["state"] != "COMPLETED"])
    if todo:
        _submit_stages(run_dir, run, planned, todo)
    return {k: v or ["all"] for k, v in todo.items()}

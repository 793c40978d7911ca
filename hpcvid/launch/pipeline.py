"""Pipeline specs: stages with their job specs, `after:` dependencies and per-stage cluster resources.

    pipeline:
      name: quickstart
      run_dir: runs                     # each submission gets runs/<name>-<timestamp>/
      stages:
        prep:
          job: jobs/quickstart_prep.yaml
          set: ["prep.shards.rows_per_shard=2"]
          resources: {array_tasks: 2, array_parallelism: 2, cpus_per_task: 1, time_min: 20}
        train_ae:
          job: jobs/tiny_reducio.yaml
          after: [prep]
          resources: {nodes: 1, tasks_per_node: 2}

Specs are resolved (YAML + overrides, validated) at submit time and frozen into the run directory, so editing a
job file later never changes a submitted pipeline.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from hpcvid.config import SpecError, UserError, apply_override, load_job, parse_spec, to_dict


@dataclass(frozen=True)
class Resources:
    """What one stage asks of the scheduler. Unknown keys are refused like any spec key."""
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: Optional[float] = None
    time_min: int = 60
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    array_tasks: int = 1                  # array stages (prep): tasks that split the work; 1 = a plain job
    array_parallelism: int = 16           # at most this many array tasks run at once
    mpi: Literal["pmi2", "pmix", "none"] = "pmi2"   # srun --mpi=... for multi-task MPI stages
    signal_delay_s: int = 120             # warning before the time limit, so a training stage can requeue
    sbatch_extra: dict[str, str] = field(default_factory=dict)   # more #SBATCH options; "" for a bare flag

    def validate(self, at: str) -> None:
        from hpcvid.config import _positive_or_none, _ValueProblem

        _positive_or_none(self, at, "nodes", "tasks_per_node", "cpus_per_task", "mem_gb", "time_min",
                          "array_tasks", "array_parallelism")
        if self.gpus_per_node < 0:
            raise _ValueProblem(f"{at}.gpus_per_node", f"must be >= 0, got {self.gpus_per_node}")

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node


@dataclass(frozen=True)
class StageEntry:
    job: str                               # job spec file holding this stage's section
    stage: Optional[str] = None            # which stage runs (default: the entry's name)
    set: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    stages: dict[str, StageEntry]
    run_dir: str = "runs"


@dataclass(frozen=True)
class PlannedStage:
    """One stage ready to submit: its resolved spec (plain data) and its resources."""
    name: str
    stage: str
    spec: dict[str, Any]
    after: list[str]
    resources: Resources
    source: str                            # job file, for error messages at run time


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[PipelineSpec, list[PlannedStage]]:
    """Read a pipeline file, validate it and every stage's job spec; stages come back in dependency order."""
    from hpcvid.stages import STAGES

    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise SpecError(source, "", f"cannot read the pipeline file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SpecError(source, "", f"not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict) or set(raw) != {"pipeline"}:
        raise SpecError(source, "", "expected exactly one top-level key 'pipeline'")
    for item in overrides:
        apply_override(raw, item, source)
    spec: PipelineSpec = parse_spec(PipelineSpec, raw["pipeline"], source, "pipeline")
    for name, entry in spec.stages.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):   # names become file and shell variable names
            raise SpecError(source, f"pipeline.stages.{name}", "a stage name must be letters, digits and _")
        kind = entry.stage or name
        if kind not in STAGES:
            raise SpecError(source, f"pipeline.stages.{name}.stage",
                            f"unknown stage {kind!r}; stages: {', '.join(STAGES)}")
        for dep in entry.after:
            if dep not in spec.stages:
                raise SpecError(source, f"pipeline.stages.{name}.after", f"{dep!r} is not a stage of this pipeline")
        if entry.resources.array_tasks > 1 and not STAGES[kind].array:
            raise SpecError(source, f"pipeline.stages.{name}.resources.array_tasks",
                            f"stage {kind!r} does not split over array tasks")
    planned = []
    for name in _dependency_order(spec, source):
        entry = spec.stages[name]
        kind = entry.stage or name
        job_path = _relative_to(entry.job, Path(path).parent)
        job = load_job(job_path, entry.set)
        planned.append(PlannedStage(name, kind, to_dict(job.stage(kind, str(job_path))), list(entry.after),
                                    entry.resources, str(job_path)))
    return spec, planned


def _relative_to(job: str, folder: Path) -> Path:
    """Job paths resolve from the working directory first, then from the pipeline file's folder."""
    path = Path(job)
    if path.is_absolute() or path.exists():
        return path
    beside = folder / job
    if beside.exists():
        return beside
    raise UserError(f"{job}: job file not found (looked in . and {folder})")


def _dependency_order(spec: PipelineSpec, source: str) -> list[str]:
    order, state = [], {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise SpecError(source, f"pipeline.stages.{name}.after", f"dependency cycle: {' -> '.join(chain + [name])}")
        state[name] = "visiting"
        for dep in spec.stages[name].after:
            visit(dep, chain + [name])
        state[name] = "done"
        order.append(name)

    for name in spec.stages:
        visit(name, [])
    return order

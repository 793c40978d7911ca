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

Names and resource values end up inside `#SBATCH` lines (ours and submitit's), where quoting does not protect them
from a newline, so they are checked here, when the file is loaded, and again where they are used
(`check_planned_stage`): see "What resource values may hold" in docs/cluster.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


from hpcvid.config import (SpecError, UserError, _positive_or_none, _ValueProblem, apply_override, load_job,
                           parse_spec, read_yaml, to_dict)

MAX_SBATCH_VALUE_CHARS = 256
MAX_NAME_CHARS = 64
SBATCH_OPTION_NAME = re.compile(r"[a-z][a-z0-9-]{0,63}")          # a long option of sbatch, without the dashes
STAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")                # file names and shell variable names
PIPELINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")         # the run folder's name starts with it
# sbatch starts another component of a heterogeneous job at any #SBATCH line holding one of these words, anywhere
JOB_SPLITTING_WORDS = ("hetjob", "packjob")
# sbatch options that hpcvid writes itself, and what sets them instead; sbatch_extra may not repeat or override them
_LOGS, _REQUEUE = "nothing (hpcvid picks the log files)", "nothing (training stages requeue themselves)"
PIPELINE_SBATCH_OPTIONS = {
    "job-name": "the stage's name", "dependency": "the stage's after: list",
    "nodes": "resources.nodes", "ntasks": "resources.nodes and resources.tasks_per_node",
    "ntasks-per-node": "resources.tasks_per_node", "cpus-per-task": "resources.cpus_per_task",
    "gpus": "resources.gpus_per_node", "gpus-per-node": "resources.gpus_per_node", "mem": "resources.mem_gb",
    "time": "resources.time_min", "signal": "resources.signal_delay_s",
    "array": "resources.array_tasks and resources.array_parallelism",
    "partition": "resources.partition", "account": "resources.account", "qos": "resources.qos",
    "constraint": "resources.constraint",
    "requeue": _REQUEUE, "no-requeue": _REQUEUE, "output": _LOGS, "error": _LOGS, "open-mode": _LOGS,
}


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
        """Also run at the point of use (check_planned_stage), not in __post_init__: the loader needs the key path
        in the message, and a frozen Resources still holds a mutable sbatch_extra dict."""
        _positive_or_none(self, at, "nodes", "tasks_per_node", "cpus_per_task", "mem_gb", "time_min",
                          "array_tasks", "array_parallelism")
        if self.gpus_per_node < 0:
            raise _ValueProblem(f"{at}.gpus_per_node", f"must be >= 0, got {self.gpus_per_node}")
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(self, key)
            problem = None if value is None else sbatch_value_problem(value)
            if problem:
                raise _ValueProblem(f"{at}.{key}", problem)
        if not isinstance(self.sbatch_extra, dict):
            raise _ValueProblem(f"{at}.sbatch_extra", f"expected a mapping, got {type(self.sbatch_extra).__name__}")
        for option, value in self.sbatch_extra.items():
            problem = sbatch_option_problem(option)
            if problem:
                raise _ValueProblem(f"{at}.sbatch_extra", problem)
            problem = sbatch_value_problem(value)
            if problem:
                raise _ValueProblem(f"{at}.sbatch_extra.{option}", problem)

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
    name: str                              # the run folder is <run_dir>/<name>-<stamp>
    stages: dict[str, StageEntry]
    run_dir: str = "runs"

    def validate(self, at: str) -> None:
        problem = pipeline_name_problem(self.name)
        if problem:
            raise _ValueProblem(f"{at}.name", problem)
        problem = sbatch_value_problem(self.run_dir, path=True)   # submitit writes the run folder into #SBATCH lines
        if problem:
            raise _ValueProblem(f"{at}.run_dir", problem)


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
    raw = read_yaml(path, "pipeline file")     # UTF-8, no duplicate keys, one-line errors
    if not isinstance(raw, dict) or set(raw) != {"pipeline"}:
        raise SpecError(source, "", "expected exactly one top-level key 'pipeline'")
    for item in overrides:
        apply_override(raw, item, source)
    stages = raw["pipeline"].get("stages") if isinstance(raw["pipeline"], dict) else None
    for name in stages if isinstance(stages, dict) else ():    # before parsing: every later key path holds the name
        problem = stage_name_problem(str(name))
        if problem:
            raise SpecError(source, f"pipeline.stages.{shown(str(name))}", problem)
    spec: PipelineSpec = parse_spec(PipelineSpec, raw["pipeline"], source, "pipeline")
    for name, entry in spec.stages.items():
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


def check_planned_stage(stage: PlannedStage) -> None:
    """The load-time checks again, where a stage's values go into a scheduler script: a PlannedStage or Resources
    built in code never met the loader, and sbatch_extra can be changed after loading."""
    problem = stage_name_problem(stage.name) if isinstance(stage.name, str) else "a stage name must be a string"
    if problem:
        raise UserError(f"stage {shown(str(stage.name))}: {problem}")
    try:
        stage.resources.validate("resources")
    except _ValueProblem as e:
        raise UserError(f"stage {stage.name}: {e.key}: {e.message}") from None


def sbatch_value_problem(value: str, path: bool = False) -> Optional[str]:
    """Why `value` cannot stand in a `#SBATCH --key=value` line, or None. Quoting does not help there: a newline
    ends the line (the rest becomes a command), sbatch takes a backslash as an escape even inside quotes, and a
    line holding "hetjob" splits the job. A `path` may hold printable non-ASCII characters and has no length cap."""
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if not path and len(value) > MAX_SBATCH_VALUE_CHARS:
        return f"{len(value)} characters; at most {MAX_SBATCH_VALUE_CHARS}"
    for i, char in enumerate(value):
        if char == "\\":
            why = "sbatch reads a backslash as an escape, even inside quotes"
        elif not char.isprintable():     # below 0x20, 0x7f, C1 controls, line separators, invisible characters
            why = "a control or invisible character would end or corrupt the #SBATCH line"
        elif not char.isascii() and not path:
            why = "only ASCII is allowed"
        else:
            continue
        rule = "a path here must be printable" if path else "a value here must be printable ASCII"
        return f"{char!r} at character {i + 1}: {why} ({rule}, without backslashes)"
    return _splitting_word(value)


def sbatch_option_problem(option: str) -> Optional[str]:
    """Why `option` cannot be an sbatch_extra key (written as `#SBATCH --option`), or None."""
    if not isinstance(option, str) or not SBATCH_OPTION_NAME.fullmatch(option):
        option = str(option)
        bad = next((f"{char!r} at character {i + 1} is not allowed; " for i, char in enumerate(option)
                    if not re.fullmatch(r"[a-z0-9-]", char)), "")
        return (f"option {shown(option)}: {bad}an option name is an sbatch long option without the dashes: "
                f"lowercase letters, digits and '-', starting with a letter, at most 64 characters (e.g. mail-user)")
    if option in PIPELINE_SBATCH_OPTIONS:
        return f"option {option!r} is set by hpcvid; use {PIPELINE_SBATCH_OPTIONS[option]} instead"
    for full, instead in PIPELINE_SBATCH_OPTIONS.items():
        if full.startswith(option):    # getopt_long takes an unambiguous prefix for the whole option
            return f"option {option!r} would be read as --{full}, which hpcvid sets; use {instead} instead"
    return _splitting_word(option)


def stage_name_problem(name: str) -> Optional[str]:
    """Stage names become file names, shell variable names and part of the job name."""
    if not STAGE_NAME.fullmatch(name) or len(name) > MAX_NAME_CHARS:
        return (f"a stage name must be letters, digits and _, not starting with a digit, at most {MAX_NAME_CHARS} "
                f"characters")
    return _splitting_word(name)


def pipeline_name_problem(name: str) -> Optional[str]:
    """The pipeline name starts the run folder's name, which submitit writes into #SBATCH lines."""
    if not PIPELINE_NAME.fullmatch(name) or len(name) > MAX_NAME_CHARS:
        return (f"{name!r} is not a usable name: letters, digits, '.', '_' and '-', starting with a letter or "
                f"digit, at most {MAX_NAME_CHARS} characters")
    return _splitting_word(name)


def _splitting_word(text: str) -> Optional[str]:
    for word in JOB_SPLITTING_WORDS:
        if word in text.lower():
            return f"{text!r} contains {word!r}, which makes sbatch split the job at that #SBATCH line"
    return None


def shown(text: str) -> str:
    """`text` for a one-line message or a comment line: as it is when printable, else as a Python literal."""
    return text if text.isprintable() else repr(text)


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

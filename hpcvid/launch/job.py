"""A stage as a picklable job: what every launcher (in-process, local processes, submitit local or SLURM) runs.

`StageJob.__init__` only stores plain data (the stage name, its resolved spec as a dict, the run directory, the
logical array task); `__call__` imports the heavy modules, works out the ranks, checks the spec and its paths as
`hpcvid check` does (inputs written by earlier stages exist only now), runs the stage and records its status.
`checkpoint()` is submitit's requeue hook: every hpcvid stage resumes by itself (prep skips complete shards,
training restarts from its latest checkpoint), so requeueing means resubmitting the same job unchanged.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional


class StageJob:
    def __init__(self, stage: str, spec: dict[str, Any], run_dir: str, array_task: Optional[int] = None,
                 array_count: Optional[int] = None, source: str = "<pipeline>", cwd: Optional[str] = None,
                 name: Optional[str] = None):
        self.stage, self.spec, self.run_dir = stage, spec, str(Path(run_dir).resolve())
        self.name = name or stage          # the pipeline's name for this entry (two entries may run one stage)
        self.array_task, self.array_count, self.source = array_task, array_count, source
        self.cwd = cwd or os.getcwd()      # relative paths in the spec mean what they meant at submit time

    # ------------------------------------------------------------------------------------------------ running

    def __call__(self) -> dict[str, Any]:
        from hpcvid.config import JobSpec, parse_spec
        from hpcvid.dist import Env
        from hpcvid.stages import get_stage
        from hpcvid.stages.runner import run_stage

        info = get_stage(self.stage)
        os.chdir(self.cwd)
        if self.array_task is not None:     # our logical task id survives `hpcvid retry` of a subset of tasks
            os.environ["HPCVID_ARRAY_TASK_ID"] = str(self.array_task)
            os.environ["HPCVID_ARRAY_TASK_COUNT"] = str(self.array_count)
        _export_torch_rendezvous(info.comm)
        env = Env.discover()
        result = run_stage(self.stage, lambda: parse_spec(JobSpec, {self.stage: self.spec}, self.source),
                           self.source, env, status=lambda state, **extra: self._record(env, state, **extra))
        summary = _plain(result)
        self._record(env, "COMPLETED", result=summary)
        return summary

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit calls this on preemption or time limit: requeue the same job; the stage resumes itself."""
        import submitit

        return submitit.helpers.DelayedSubmission(self.with_task(self.array_task))

    def with_task(self, array_task: Optional[int]) -> "StageJob":
        return StageJob(self.stage, self.spec, self.run_dir, array_task, self.array_count, self.source, self.cwd,
                        self.name)

    # ------------------------------------------------------------------------------------------------ status

    def status_path(self, rank: int) -> Path:
        task = f"task{self.array_task:04d}" if self.array_task is not None else "job"
        return Path(self.run_dir) / "status" / self.name / f"{task}.rank{rank:04d}.json"

    def _record(self, env, state: str, **extra: Any) -> None:
        from hpcvid.io import atomic_write_json

        path = self.status_path(env.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"stage": self.name, "kind": self.stage, "state": state, "array_task": self.array_task,
                                 "rank": env.rank, "world_size": env.world_size, "host": socket.gethostname(),
                                 "pid": os.getpid(), "job_id": env.job_id, "time": time.time(), **extra})

    def __repr__(self) -> str:
        task = "" if self.array_task is None else f", task {self.array_task}/{self.array_count}"
        return f"StageJob({self.name}: {self.stage}{task}, run_dir={self.run_dir})"


def _export_torch_rendezvous(comm_kind: str) -> None:
    """Inside a multi-task submitit job without MPI, give torch.distributed its rendezvous variables.

    MASTER_ADDR is the job's first node and MASTER_PORT is derived from the job id (submitit's helper), so every
    task of the job agrees without talking first. Under srun with PMI, "mpi" stages use MPI instead.
    """
    if "RANK" in os.environ or "SUBMITIT_FOLDER" not in os.environ:
        return
    import submitit

    job_env = submitit.JobEnvironment()
    under_mpi = any(k in os.environ for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"))
    if job_env.num_tasks > 1 and (comm_kind == "torch" or not under_mpi):
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _plain(result: Any) -> dict[str, Any]:
    """A stage result as JSON-able data (dataclass or dict)."""
    import dataclasses

    data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result or {})
    return json.loads(json.dumps(data, default=str))


def run_pickled(path: str) -> int:
    """Entry point for local multi-process launches: `python -m hpcvid.launch.job JOB.pkl` on every rank.

    A user error or a stopped run is one line and exit 2 or 3, as from the CLI; a spec refused at start reaches
    every rank, and only rank 0 prints it (the ranks share one log)."""
    import pickle

    from hpcvid.config import EXIT_PREEMPTED, EXIT_RUN_STOPPED, EXIT_USER_ERROR, Preempted, RunStopped, UserError
    from hpcvid.dist import Env

    with open(path, "rb") as f:   # our own file, written by the launcher a moment ago
        job = pickle.load(f)
    codes = ((UserError, EXIT_USER_ERROR), (RunStopped, EXIT_RUN_STOPPED), (Preempted, EXIT_PREEMPTED))
    try:
        job()
    except (UserError, RunStopped, Preempted) as e:
        if Env.discover().rank == 0:
            print("\n".join(f"hpcvid {job.stage}: {line}" for line in str(e).splitlines()), file=sys.stderr,
                  flush=True)
        return next(code for kind, code in codes if isinstance(e, kind))
    return 0


if __name__ == "__main__":
    sys.exit(run_pickled(sys.argv[1]))

"""Executors: one small interface, four ways to run a stage's jobs.

    debug      in this process, one rank (pdb works)                                       blocking
    processes  local processes: `mpiexec -n N` for MPI stages, N spawned ranks with torchrun-style
               variables for torch.distributed stages                                      blocking
    local      submitit's LocalExecutor (tasks as processes, torch rendezvous from submitit) blocking
    slurm      submitit's SlurmExecutor: arrays, multi-node jobs, afterok dependencies      returns at once

`submit(stage, jobs, after)` takes the planned stage, one StageJob per array task, and the job ids it must wait
for; it returns one job id per StageJob. Blocking executors run to completion before returning, so a pipeline on
them simply runs its stages in dependency order.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from hpcvid.config import UserError
from hpcvid.launch.job import StageJob
from hpcvid.launch.pipeline import PlannedStage, Resources, check_planned_stage, sbatch_value_problem, shown

CLUSTERS = ("debug", "processes", "local", "slurm")


class Executor:
    name = "base"
    blocking = True

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def submit(self, stage: PlannedStage, jobs: list[StageJob], after: list[str]) -> list[str]:
        raise NotImplementedError


def make_executor(cluster: str, folder: Path) -> Executor:
    kinds = {"debug": DebugExecutor, "processes": ProcessExecutor, "local": SubmititExecutor,
             "slurm": SubmititExecutor}
    if cluster not in kinds:
        raise UserError(f"--cluster {cluster!r}: choose one of {', '.join(CLUSTERS)}")
    return kinds[cluster](folder) if cluster in ("debug", "processes") else SubmititExecutor(folder, cluster)


# ---------------------------------------------------------------------------------------------------- in-process

class DebugExecutor(Executor):
    """Every task in this process, one after the other, as rank 0 of 1."""
    name = "debug"

    def submit(self, stage: PlannedStage, jobs: list[StageJob], after: list[str]) -> list[str]:
        ids = []
        for i, job in enumerate(jobs):
            with _preserved_process_state():
                try:
                    job()
                except Exception as e:   # noqa: BLE001 - recorded in the job's status file; the pipeline stops there
                    print(f"hpcvid {stage.name}: task {i} failed: {type(e).__name__}: {e}", file=sys.stderr)
            ids.append(f"debug-{i}")
        return ids


@contextlib.contextmanager
def _preserved_process_state() -> Iterator[None]:
    """A job sets array-task variables and changes folder; in-process runs must not leak them to the next job."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)


# ---------------------------------------------------------------------------------------------------- processes

class ProcessExecutor(Executor):
    """Local ranks without a scheduler: mpiexec for MPI stages, torchrun-style spawning for torch stages."""
    name = "processes"

    def submit(self, stage: PlannedStage, jobs: list[StageJob], after: list[str]) -> list[str]:
        from hpcvid.stages import get_stage

        comm = get_stage(stage.stage).comm
        ranks = stage.resources.tasks
        ids = []
        for i, job in enumerate(jobs):
            pickled = self.folder / f"{stage.name}-{i}.pkl"
            pickled.parent.mkdir(parents=True, exist_ok=True)
            pickled.write_bytes(pickle.dumps(job))
            log = self.folder / f"{stage.name}-{i}.log"
            command = [sys.executable, "-m", "hpcvid.launch.job", str(pickled)]
            with open(log, "wb") as out:
                if comm == "mpi" and ranks > 1:
                    procs = [subprocess.Popen([_mpiexec(), "-n", str(ranks), *command], stdout=out,
                                              stderr=subprocess.STDOUT, env=_rank_env())]
                else:
                    port = _free_port()
                    procs = [subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                              env=_rank_env(r, ranks, port) if ranks > 1 else _rank_env())
                             for r in range(ranks)]
                codes = [p.wait() for p in procs]
            ids.append(f"pid-{procs[0].pid}")
            if any(codes):
                print(f"hpcvid {stage.name}: task {i} exited {codes}; log: {log}", file=sys.stderr)
        return ids


def _mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        raise UserError("--cluster processes: no mpiexec found (pip install mpich, or load your site MPI)")
    return found


def _rank_env(rank: int | None = None, world: int = 1, port: int = 0) -> dict[str, str]:
    launch = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SUBMITIT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launch)}
    env.setdefault("OMP_NUM_THREADS", "1")
    if rank is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- submitit

class SubmititExecutor(Executor):
    """submitit on SLURM (or its local stand-in): arrays with a parallelism cap, afterok dependencies, requeue."""

    def __init__(self, folder: Path, cluster: str):
        super().__init__(folder)
        self.name = cluster
        self.blocking = cluster == "local"

    def _executor(self, stage: PlannedStage, after: list[str]):
        import submitit

        # submitit writes #SBATCH lines unchecked, and a stage built in code never met the pipeline file's checks
        check_planned_stage(stage)
        r: Resources = stage.resources
        folder = self.folder / stage.name / "%j"
        if self.name == "local":
            ex = submitit.LocalExecutor(folder=folder)
            ex.update_parameters(timeout_min=r.time_min, tasks_per_node=r.tasks_per_node, nodes=1,
                                 gpus_per_node=r.gpus_per_node, cpus_per_task=r.cpus_per_task)
            return ex
        problem = sbatch_value_problem(str(folder.absolute()), path=True)   # submitit writes it into --output
        if problem:
            raise UserError(f"{shown(str(folder))}: cannot hold SLURM logs: {problem}")
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=10)
        ex.update_parameters(**slurm_parameters(stage, after))
        return ex

    def submit(self, stage: PlannedStage, jobs: list[StageJob], after: list[str]) -> list[str]:
        ex = self._executor(stage, after)
        if len(jobs) == 1 and jobs[0].array_task is None:
            submitted = [ex.submit(jobs[0])]
        else:
            submitted = _submit_array(ex, jobs)
        if self.blocking:
            for job in submitted:
                with contextlib.suppress(Exception):   # failures are read from status files and logs
                    job.result()
        return [str(job.job_id) for job in submitted]


def _submit_array(ex, jobs: list[StageJob]):
    """One array (SLURM array; local: concurrent processes) whose task i runs jobs[i] (each a Checkpointable StageJob, so requeue works per task)."""
    with ex.batch():
        return [ex.submit(job) for job in jobs]


def slurm_parameters(stage: PlannedStage, after: list[str]) -> dict[str, object]:
    """What SubmititExecutor passes to submitit's SlurmExecutor.update_parameters for this stage."""
    r = stage.resources
    params = dict(job_name=f"hpcvid-{stage.name}", time=r.time_min, nodes=r.nodes,
                  ntasks_per_node=r.tasks_per_node, cpus_per_task=r.cpus_per_task,
                  array_parallelism=r.array_parallelism, signal_delay_s=r.signal_delay_s,
                  srun_args=[f"--mpi={r.mpi}"], additional_parameters=sbatch_extra(r))
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    if r.mem_gb:
        params["mem"] = f"{int(r.mem_gb * 1024)}M"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(r, key):
            params[key] = getattr(r, key)
    if after:
        params["dependency"] = "afterok:" + ":".join(after)
    return params


def sbatch_extra(r: Resources) -> dict[str, object]:
    """`sbatch_extra` as submitit wants it: a bare flag ("") becomes True."""
    return {key: (True if value == "" else value) for key, value in r.sbatch_extra.items()}

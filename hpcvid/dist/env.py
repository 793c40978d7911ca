"""Where this process sits in a job: `Env`, read from the launcher's variables (MPI, torchrun, SLURM or nothing),
and the CPU cores it may use. Stages never ask how they were launched; they get an `Env`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

LAUNCHERS = ("single", "mpi", "torchrun", "slurm")


def _get_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _tasks_per_node(environ: Mapping[str, str], name: str, node: int) -> int | None:
    """SLURM writes per-node counts like '2(x3),1': expand them and take this node's entry."""
    raw = environ.get(name)
    if not raw:
        return None
    counts = []
    for part in raw.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"environment variable {name}={raw!r} is not a SLURM task count like '2(x3),1'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if node < len(counts) else counts[0]


def _launcher_vars(e: Mapping[str, str]) -> tuple:
    """(launcher, rank, size, local rank, local size, node, node count) variable names; None where unstated."""
    if "OMPI_COMM_WORLD_RANK" in e:  # Open MPI's mpirun
        w = "OMPI_COMM_WORLD_"
        return "mpi", w + "RANK", w + "SIZE", w + "LOCAL_RANK", w + "LOCAL_SIZE", None, None
    if "PMI_RANK" in e:  # MPICH Hydra, Intel MPI, srun --mpi=pmi2
        return "mpi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", None, None
    if "PMIX_RANK" in e:  # PMIx states no size of its own: take the MPI's, else srun's
        size = next((n for n in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS") if n in e), "PMI_SIZE")
        if "OMPI_COMM_WORLD_LOCAL_RANK" not in e and "SLURM_LOCALID" in e:
            return "mpi", "PMIX_RANK", size, "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_NODEID", None
        return "mpi", "PMIX_RANK", size, "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", None, None
    if "RANK" in e and "WORLD_SIZE" in e:
        return "torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE"
    if "SLURM_PROCID" in e:  # an srun step; the step's own counts beat the allocation's
        ntasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in e else "SLURM_NTASKS"
        nnodes = next((n for n in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") if n in e), None)
        return "slurm", "SLURM_PROCID", ntasks, "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_NODEID", nnodes
    return "single", None, None, None, None, None, None


def _check_index(kind: str, index: int, size: int, index_var: str, size_var: str) -> None:
    if size < 1:
        raise ValueError(f"{size_var}={size} must be at least 1")
    if not 0 <= index < size:
        raise ValueError(f"{kind} {index_var}={index} must lie in [0, {size_var}={size})")


@dataclass(frozen=True)
class Env:
    """This process's place in the job: rank in its launched group, node, and position in a job array."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    array_task_id: int | None  # 0-based position in the array (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)
    array_task_count: int | None
    job_id: str | None
    launcher: str

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher {self.launcher!r} is not one of {LAUNCHERS}")
        _check_index("rank", self.rank, self.world_size, "rank", "world_size")
        _check_index("local rank", self.local_rank, self.local_world_size, "local_rank", "local_world_size")
        _check_index("node", self.node_rank, self.num_nodes, "node_rank", "num_nodes")
        if (self.array_task_id is None) != (self.array_task_count is None):
            raise ValueError("array_task_id and array_task_count must be given together")
        if self.array_task_id is not None:
            _check_index("array task", self.array_task_id, self.array_task_count, "array_task_id", "array_task_count")

    @classmethod
    def single(cls, array_task_id: int | None = None, array_task_count: int | None = None) -> Env:
        """Rank 0 of 1: tests and in-process runs."""
        return cls(0, 1, 0, 1, 0, 1, array_task_id, array_task_count, None, "single")

    @classmethod
    def discover(cls, environ: Mapping[str, str] | None = None) -> Env:
        """Read the launcher's variables. MPI wins over SLURM: `mpiexec` inside sbatch inherits SLURM_PROCID=0."""
        e = os.environ if environ is None else environ
        launcher, rv, sv, lrv, lsv, nv, nnv = _launcher_vars(e)
        rank, world = (0, 1) if rv is None else (_get_int(e, rv), _get_int(e, sv))
        if rank is None or world is None:
            raise ValueError(f"{rv}={e.get(rv)!r} needs a rank and {sv}={e.get(sv)!r} a world size")
        _check_index("rank", rank, world, rv or "rank", sv or "world_size")
        node = _get_int(e, nv) if nv else None
        nnodes = _get_int(e, nnv) if nnv else None
        lr = _get_int(e, lrv) if lrv else None
        if lsv and lsv.startswith("SLURM"):
            lw = _tasks_per_node(e, lsv, node or 0)
        else:
            lw = _get_int(e, lsv) if lsv else None
        if lw is None:  # unstated: ranks spread evenly over the nodes (all on this one if that is unstated too)
            lw, lsv = -(-world // nnodes) if nnodes else world, "local world size"
        if lr is None:
            lr, lrv = rank % lw, "local rank"
        _check_index("local rank", lr, lw, lrv, lsv)
        if nnodes is None:  # MPI launchers state no node index: assume block placement, their default
            nnodes, nnv = -(-world // lw), "node count"
        if node is None:
            node, nv = rank // lw, "node rank"
        _check_index("node", node, nnodes, nv, nnv)

        task, count = _array_position(e)
        job = e.get("SLURM_ARRAY_JOB_ID") or e.get("SLURM_JOB_ID") or None
        return cls(rank, world, lr, lw, node, nnodes, task, count, job, launcher)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_workers(self) -> int:
        """Workers over ranks and array tasks together: how many ways a stage splits its work."""
        return self.world_size * (self.array_task_count or 1)

    @property
    def worker_index(self) -> int:
        """This process's slot in [0, num_workers): array task major, rank minor."""
        return (self.array_task_id or 0) * self.world_size + self.rank

    def describe(self) -> str:
        """One line for logs, e.g. 'rank 1/2 (mpi, node 0, array task 3/8)'."""
        extra = f", array task {self.array_task_id}/{self.array_task_count}" if self.array_task_count else ""
        return f"rank {self.rank}/{self.world_size} ({self.launcher}, node {self.node_rank}{extra})"


def _array_position(e: Mapping[str, str]) -> tuple[int | None, int | None]:
    """0-based array position and count; HPCVID_* (already 0-based) emulate arrays locally and win."""
    if "HPCVID_ARRAY_TASK_ID" in e or "HPCVID_ARRAY_TASK_COUNT" in e:
        task, count = _get_int(e, "HPCVID_ARRAY_TASK_ID"), _get_int(e, "HPCVID_ARRAY_TASK_COUNT")
        if task is None or count is None:
            raise ValueError("HPCVID_ARRAY_TASK_ID and HPCVID_ARRAY_TASK_COUNT must be set together")
        _check_index("array task", task, count, "HPCVID_ARRAY_TASK_ID", "HPCVID_ARRAY_TASK_COUNT")
        return task, count
    task = _get_int(e, "SLURM_ARRAY_TASK_ID")
    if task is None:
        return None, None
    lo, hi = _get_int(e, "SLURM_ARRAY_TASK_MIN", 0), _get_int(e, "SLURM_ARRAY_TASK_MAX")
    step = _get_int(e, "SLURM_ARRAY_TASK_STEP", 1) or 1
    count = _get_int(e, "SLURM_ARRAY_TASK_COUNT")
    if count is None:
        if hi is None:
            raise ValueError("SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor _MAX is")
        count = (hi - lo) // step + 1
    pos, off = divmod(task - lo, step)
    if off or not 0 <= pos < count:
        raise ValueError(f"SLURM_ARRAY_TASK_ID={task} is not in the range MIN={lo}, STEP={step}, COUNT={count}: "
                         "use a contiguous --array (e.g. 0-7), or set HPCVID_ARRAY_TASK_ID/_COUNT")
    return pos, count


def rank_cores(env: Env) -> int:
    """CPU cores this rank may use: its affinity set (SLURM/launcher pinning), or an equal share of the node's
    cores when the launcher did not pin the ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores >= (os.cpu_count() or 1) and env.local_world_size > 1:
        cores //= env.local_world_size
    return max(1, cores)

"""Env.discover over hand-written launcher environments, the worker arithmetic, and LocalComm."""
import itertools

import numpy as np
import pytest
import torch

from hpcvid.dist import Comm, Env, LocalComm, make_comm


def test_single_when_no_launcher_variables():
    env = Env.discover({"HOME": "/root", "PATH": "/usr/bin"})
    assert env == Env.single()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert (env.node_rank, env.num_nodes, env.launcher) == (0, 1, "single")
    assert env.array_task_id is None and env.array_task_count is None and env.job_id is None
    assert env.is_main and env.num_workers == 1 and env.worker_index == 0
    assert env.describe() == "rank 0/1 (single, node 0)"


def test_open_mpi():
    env = Env.discover({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
                        "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.node_rank, env.num_nodes, env.launcher) == (1, 2, "mpi")  # block placement
    assert not env.is_main


def test_mpich_hydra():
    env = Env.discover({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
                        "PMI_FD": "9", "PMI_HOSTNAME": "vm"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 1, 2)
    assert (env.node_rank, env.num_nodes, env.launcher) == (0, 1, "mpi")
    assert env.describe() == "rank 1/2 (mpi, node 0)"


def test_pmix_takes_size_from_mpi_or_srun():
    env = Env.discover({"PMIX_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
                        "OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 4, 3, "mpi")
    env = Env.discover({"PMIX_RANK": "2", "SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
                        "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (2, 4, 0, 2)
    assert (env.node_rank, env.num_nodes, env.launcher) == (1, 2, "mpi")
    with pytest.raises(ValueError, match="PMI_SIZE"):
        Env.discover({"PMIX_RANK": "0"})


def test_torchrun():
    env = Env.discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.node_rank, env.num_nodes, env.launcher) == (1, 2, "torchrun")
    # a hand-made torchrun-style launch states only the ranks: all on one node
    env = Env.discover({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (env.local_world_size, env.node_rank, env.num_nodes) == (2, 0, 1)


def test_slurm_step_with_array():
    env = Env.discover({
        "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2(x2)",
        "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "1001", "SLURM_ARRAY_JOB_ID": "1000",
        "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "12",
        "SLURM_ARRAY_TASK_COUNT": "8"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.node_rank, env.num_nodes, env.launcher) == (1, 2, "slurm")
    assert (env.array_task_id, env.array_task_count, env.job_id) == (2, 8, "1000")  # 7 - MIN 5
    assert env.num_workers == 32 and env.worker_index == 2 * 4 + 3
    assert env.describe() == "rank 3/4 (slurm, node 1, array task 2/8)"


def test_slurm_array_count_from_min_max_and_step():
    base = {"SLURM_JOB_ID": "77"}
    env = Env.discover({**base, "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4"})
    assert (env.array_task_id, env.array_task_count, env.job_id, env.launcher) == (2, 4, "77", "single")
    env = Env.discover({**base, "SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "0",
                        "SLURM_ARRAY_TASK_MAX": "10", "SLURM_ARRAY_TASK_STEP": "2"})
    assert (env.array_task_id, env.array_task_count) == (3, 6)
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID=5"):  # a list like --array=1,5,7: not contiguous
        Env.discover({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
                      "SLURM_ARRAY_TASK_COUNT": "3"})


def test_hpcvid_array_override_wins():
    env = Env.discover({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "8",
                        "HPCVID_ARRAY_TASK_ID": "1", "HPCVID_ARRAY_TASK_COUNT": "3"})
    assert (env.array_task_id, env.array_task_count) == (1, 3)
    with pytest.raises(ValueError, match="HPCVID_ARRAY_TASK_COUNT"):
        Env.discover({"HPCVID_ARRAY_TASK_ID": "1"})


def test_slurm_tasks_per_node_forms():
    common = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_NODEID": "1", "SLURM_NNODES": "2"}
    assert Env.discover({**common, "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2,1"}).local_world_size == 1
    assert Env.discover({**common, "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1(x1),2"}).local_world_size == 2
    env = Env.discover({**common, "SLURM_LOCALID": "0"})  # missing: spread evenly over the nodes
    assert env.local_world_size == 2
    env = Env.discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.local_world_size, env.num_nodes, env.launcher) == (1, 1, "slurm")


def test_mpiexec_inside_sbatch_beats_slurm_variables():
    # The batch step says rank 0 of 4 on 2 nodes; the MPI ranks started inside it must not read that.
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "42"}
    envs = [Env.discover({**batch, "PMI_RANK": str(r), "PMI_SIZE": "4", "MPI_LOCALRANKID": str(r % 2),
                          "MPI_LOCALNRANKS": "2"}) for r in range(4)]
    assert [e.rank for e in envs] == [0, 1, 2, 3]
    assert [e.node_rank for e in envs] == [0, 0, 1, 1]
    assert all(e.launcher == "mpi" and e.world_size == 4 and e.job_id == "42" for e in envs)
    # torchrun variables inside an sbatch script also beat the batch step's SLURM_PROCID
    assert Env.discover({**batch, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}).rank == 3


@pytest.mark.parametrize("world,tasks", [(1, None), (3, None), (1, 4), (2, 3), (4, 5)])
def test_workers_cover_every_rank_and_array_task_once(world, tasks):
    slots = []
    for task, rank in itertools.product(range(tasks or 1), range(world)):
        environ = {"PMI_RANK": str(rank), "PMI_SIZE": str(world)}
        if tasks:
            environ.update(SLURM_ARRAY_TASK_ID=str(10 + task), SLURM_ARRAY_TASK_MIN="10",
                           SLURM_ARRAY_TASK_COUNT=str(tasks))
        env = Env.discover(environ)
        assert env.num_workers == world * (tasks or 1)
        slots.append(env.worker_index)
    assert sorted(slots) == list(range(world * (tasks or 1)))


@pytest.mark.parametrize("environ,names", [
    ({"PMI_RANK": "one", "PMI_SIZE": "2"}, ["PMI_RANK", "'one'"]),
    ({"PMI_RANK": "2", "PMI_SIZE": "2"}, ["PMI_RANK=2", "PMI_SIZE=2"]),
    ({"PMI_RANK": "-1", "PMI_SIZE": "2"}, ["PMI_RANK=-1"]),
    ({"PMI_RANK": "0", "PMI_SIZE": "0"}, ["PMI_SIZE=0"]),
    ({"OMPI_COMM_WORLD_RANK": "0"}, ["OMPI_COMM_WORLD_SIZE"]),
    ({"RANK": "0", "WORLD_SIZE": "2x"}, ["WORLD_SIZE", "'2x'"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, ["LOCAL_RANK=3"]),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, ["SLURM_PROCID=4", "SLURM_NTASKS=4"]),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "two"}, ["SLURM_NTASKS_PER_NODE"]),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "2", "SLURM_NNODES": "2"}, ["SLURM_NODEID=2"]),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, ["SLURM_ARRAY_TASK_ID", "'x'"]),
    ({"SLURM_ARRAY_TASK_ID": "1"}, ["SLURM_ARRAY_TASK_COUNT"]),
    ({"HPCVID_ARRAY_TASK_ID": "3", "HPCVID_ARRAY_TASK_COUNT": "3"}, ["HPCVID_ARRAY_TASK_ID=3"]),
])
def test_malformed_variables_name_themselves(environ, names):
    with pytest.raises(ValueError) as err:
        Env.discover(environ)
    for name in names:
        assert name in str(err.value)


def test_env_is_frozen_and_checks_fields():
    env = Env.single(array_task_id=1, array_task_count=2)
    with pytest.raises(AttributeError):
        env.rank = 1
    assert env.worker_index == 1 and env.num_workers == 2
    with pytest.raises(ValueError, match="launcher"):
        Env(0, 1, 0, 1, 0, 1, None, None, None, "pbs")
    with pytest.raises(ValueError, match="together"):
        Env(0, 1, 0, 1, 0, 1, 0, None, None, "single")


def test_local_comm_is_identity():
    comm = make_comm(Env.single())
    assert isinstance(comm, LocalComm) and isinstance(comm, Comm)
    assert (comm.rank, comm.world_size) == (0, 1)
    comm.barrier()
    payload = {"a": [1, 2]}
    assert comm.broadcast(payload) is payload
    assert comm.all_gather(payload) == [payload]
    assert comm.all_reduce(3) == 3 and isinstance(comm.all_reduce(3), int)
    assert comm.all_reduce(2.5, op="max") == 2.5
    arr = np.arange(4, dtype=np.float32)
    out = comm.all_reduce(arr, op="min")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.tolist() == [0, 1, 2, 3]
    assert out is not arr  # numpy results never alias the input, as with MPI
    t = torch.ones(3)
    assert comm.all_reduce(t) is t and t.tolist() == [1, 1, 1]
    comm.close()


def test_local_comm_errors():
    comm = LocalComm()
    with pytest.raises(RuntimeError, match="one rank"):
        comm.send("x", dest=1)
    with pytest.raises(RuntimeError, match="one rank"):
        comm.recv(source=0)
    with pytest.raises(RuntimeError, match="one rank"):
        comm.send_tensor(torch.zeros(2), dest=0)
    with pytest.raises(RuntimeError, match="one rank"):
        comm.recv_tensor(torch.zeros(2), source=0)
    with pytest.raises(ValueError, match="'prod'"):
        comm.all_reduce(1, op="prod")
    with pytest.raises(TypeError, match="str"):
        comm.all_reduce("1")
    with pytest.raises(ValueError, match="root 1"):
        comm.broadcast(1, root=1)


def test_make_comm_rejects_bad_backends():
    with pytest.raises(ValueError, match=r"'nccl'.*auto.*mpi.*torch.*local"):
        make_comm(Env.single(), backend="nccl")
    two = Env.discover({"PMI_RANK": "0", "PMI_SIZE": "2"})
    with pytest.raises(ValueError, match="2 ranks"):
        make_comm(two, backend="local")

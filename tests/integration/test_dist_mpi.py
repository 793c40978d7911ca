"""Real 2-rank runs of hpcvid.dist: under the venv's mpiexec, and as two torchrun-style processes (gloo)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")
MPIEXEC = Path(sys.executable).parent / "mpiexec"
TIMEOUT_S = 120
LAUNCH_VARS = ("OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "SLURM_", "HPCVID_ARRAY", "RANK", "WORLD_SIZE", "LOCAL_",
               "GROUP_", "MASTER_", "TORCHELASTIC")


def clean_env(**extra):
    """This process's environment without any launcher's variables, so the ranks see only what we set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def check(procs):
    """Wait for every process; on failure or timeout show their stderr."""
    failed = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            failed.append(f"timed out after {TIMEOUT_S} s:\n{err}")
            continue
        if p.returncode != 0:
            failed.append(f"exit {p.returncode}:\n{err}")
    if failed:
        for msg in failed:
            print(msg, file=sys.stderr)
        pytest.fail("worker failed:\n" + "\n".join(failed))


def read(out_dir):
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def expected(rank):
    """What `exercise` in dist_worker.py must see on `rank` of 2, whatever the Comm."""
    peer = 1 - rank
    sent = [[float(v + 100 * peer) for v in row] for row in [[0, 1, 2], [3, 4, 5]]]
    out = {
        "rank": rank, "world": 2, "env_rank": rank,
        "bcast": {"from": 0, "list": [1, 2]},
        "bcast_root1": "hello from 1",
        "gather": [{"rank": 0, "sq": 0}, {"rank": 1, "sq": 1}],
        "sum_int": 3, "max_float": 1.5,
        "np_sum": [1, 12], "np_dtype": "int64",
        "np_min": [[1.5, -1.0]], "np_scalar": [1.25, "float32"], "np_half": [[1.0, 1.0], "float16"],
        "torch_sum": [[3.0] * 3] * 2, "torch_same": True,
        "torch_max_bf16": [1.0, 3.0],
        "recv_obj": {"msg": f"{peer}->{rank}", "n": [peer]},
        "recv_tensor": sent, "recv_tensor_t": sent, "recv_half": [peer + 0.5, -1.0],
    }
    if rank == 1:
        out["mismatch"] = "recv_tensor from rank 0: got torch.float32 (4,), out is torch.float32 (5,)"
        out["after_mismatch"] = "after"
    return out


def assert_exercise(results, key, kind):
    for rank, res in enumerate(results):
        got = dict(res[key])
        assert got.pop("kind") == kind
        assert got == expected(rank)


needs_mpiexec = pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable} "
                                   "(pip install mpich mpi4py into the venv)")


@needs_mpiexec
def test_mpi_two_ranks(tmp_path):
    cmd = [str(MPIEXEC), "-n", "2", sys.executable, str(WORKER), "mpi", str(tmp_path)]
    check([subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)])
    results = read(tmp_path)
    for rank, res in enumerate(results):
        assert res["env"] == [rank, 2, rank, 2, "mpi"]
        assert res["gloo_sum"] == [3.0, 6.0] and res["gloo_backend"] == "gloo"
        assert res["destroyed"] is True
    assert_exercise(results, "mpi", "MPIComm")
    assert_exercise(results, "torch", "TorchComm")


@needs_mpiexec
def test_mpi_world_size_mismatch_is_reported(tmp_path):
    # A launcher that claims 2 ranks while MPI sees a 1-rank world (srun --mpi=none does this).
    env = clean_env(PMI_RANK="0", PMI_SIZE="2")
    cmd = [sys.executable, str(WORKER), "mismatch", str(tmp_path)]
    check([subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)])
    res = json.loads((tmp_path / "rank0.json").read_text())
    assert res["env"] == [0, 2, 0, 2, "mpi"]
    assert "1 ranks" in res["error"] and "says 2" in res["error"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_style_two_processes(tmp_path):
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)
        cmd = [sys.executable, str(WORKER), "torchrun", str(tmp_path)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    check(procs)
    results = read(tmp_path)
    for rank, res in enumerate(results):
        assert res["env"] == [rank, 2, rank, 2, "torchrun"]
        assert res["destroyed"] is True
    assert_exercise(results, "torch", "TorchComm")


ABORT_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from hpcvid.dist import Env, make_comm
from hpcvid.stages.runner import run_on_ranks

def run(spec, env, comm):
    if env.rank == 1:
        raise RuntimeError("boom on rank 1")
    comm.barrier()   # rank 0 would wait here forever if rank 1's failure did not end the job

env = Env.discover()
run_on_ranks(run, None, env, make_comm(env), "test")
sys.exit(0)
"""


@needs_mpiexec
def test_one_failing_rank_aborts_the_job_instead_of_hanging(tmp_path):
    script = tmp_path / "abort.py"
    script.write_text(ABORT_SCRIPT.format(root=str(Path(__file__).resolve().parents[2])))
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(script)], env=clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "boom on rank 1" in proc.stderr and "aborting all 2 ranks" in proc.stderr

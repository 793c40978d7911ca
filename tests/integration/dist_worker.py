"""One rank of the 2-rank dist checks: `python dist_worker.py {mpi|torchrun|mismatch} OUT_DIR`.

mpi: run under `mpiexec -n 2`; checks MPIComm, then torch.distributed brought up through it, then TorchComm.
torchrun: run as 2 processes with RANK/WORLD_SIZE/MASTER_* set; checks TorchComm from make_comm.
mismatch: run alone with PMI_RANK/PMI_SIZE claiming 2 ranks; records make_comm's error.
Each rank writes OUT_DIR/rank{N}.json with what it saw; the test compares exact values.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hpcvid.dist import (Env, MPIComm, TorchComm, destroy_torch_distributed, init_torch_distributed,  # noqa: E402
                         make_comm)


def exercise(comm, env):
    """The same collective and point-to-point checks for any Comm of 2 ranks."""
    r, peer = comm.rank, 1 - comm.rank
    out = {"rank": r, "world": comm.world_size, "env_rank": env.rank, "kind": type(comm).__name__}
    comm.barrier()
    out["bcast"] = comm.broadcast({"from": r, "list": [1, 2]} if r == 0 else None)
    out["bcast_root1"] = comm.broadcast(f"hello from {r}", root=1)
    out["gather"] = comm.all_gather({"rank": r, "sq": r * r})
    out["sum_int"] = comm.all_reduce(r + 1)
    out["max_float"] = comm.all_reduce(0.5 + r, op="max")
    arr = comm.all_reduce(np.array([r, 10 * r + 1], dtype=np.int64), op="sum")
    out["np_sum"], out["np_dtype"] = arr.tolist(), str(arr.dtype)
    out["np_min"] = comm.all_reduce(np.array([[1.5 + r, -r]], dtype=np.float32), op="min").tolist()
    scalar = comm.all_reduce(np.float32(r + 0.25), op="max")
    out["np_scalar"] = [float(scalar), type(scalar).__name__]
    half = comm.all_reduce(np.array([0.5, r], dtype=np.float16))
    out["np_half"] = [half.tolist(), str(half.dtype)]
    t = torch.full((2, 3), float(r + 1))
    res = comm.all_reduce(t, op="sum")
    out["torch_sum"], out["torch_same"] = res.tolist(), res is t
    out["torch_max_bf16"] = comm.all_reduce(torch.tensor([r, 3 - r], dtype=torch.bfloat16), op="max").tolist()
    # objects both ways, rank 0 sends first so blocking sends cannot deadlock
    if r == 0:
        comm.send({"msg": "0->1", "n": [0]}, dest=1, tag=3)
        out["recv_obj"] = comm.recv(source=1, tag=4)
    else:
        out["recv_obj"] = comm.recv(source=0, tag=3)
        comm.send({"msg": "1->0", "n": [1]}, dest=0, tag=4)
    # tensors both ways, including a non-contiguous target and a half-precision one
    mine = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 100 * r
    half = torch.tensor([r + 0.5, -1.0], dtype=torch.bfloat16)
    got = torch.zeros(2, 3)
    got_t = torch.zeros(3, 2).t()  # non-contiguous view of shape (2, 3)
    got_half = torch.zeros(2, dtype=torch.bfloat16)
    for step in range(2):
        if step == r:
            comm.send_tensor(mine, dest=peer, tag=7)
            comm.send_tensor(mine, dest=peer, tag=8)
            comm.send_tensor(half, dest=peer)
        else:
            assert comm.recv_tensor(got, source=peer, tag=7) is got
            comm.recv_tensor(got_t, source=peer, tag=8)
            comm.recv_tensor(got_half, source=peer)
    out["recv_tensor"], out["recv_tensor_t"], out["recv_half"] = got.tolist(), got_t.tolist(), got_half.tolist()
    # a receiver with the wrong shape gets a clear error, and the message is still drained
    if r == 0:
        comm.send_tensor(torch.ones(4), dest=1, tag=9)
        comm.send("after", dest=1, tag=9)
    else:
        try:
            comm.recv_tensor(torch.zeros(5), source=0, tag=9)
            out["mismatch"] = None
        except ValueError as err:
            out["mismatch"] = str(err)
        out["after_mismatch"] = comm.recv(source=0, tag=9)
    comm.barrier()
    return out


def main():
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    env = Env.discover()
    result = {"env": [env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher]}
    if mode == "mismatch":
        try:
            make_comm(env)
            result["error"] = None
        except RuntimeError as err:
            result["error"] = str(err)
    elif mode == "mpi":
        comm = make_comm(env)
        result["mpi"] = exercise(comm, env)
        init_torch_distributed(env, comm, timeout_s=60)
        init_torch_distributed(env, comm, timeout_s=60)  # idempotent
        t = torch.tensor([1.0, 2.0]) * (env.rank + 1)
        torch.distributed.all_reduce(t)
        result["gloo_sum"], result["gloo_backend"] = t.tolist(), torch.distributed.get_backend()
        result["torch"] = exercise(TorchComm(), env)
        destroy_torch_distributed()
        destroy_torch_distributed()
        result["destroyed"] = not torch.distributed.is_initialized()
        assert isinstance(comm, MPIComm)
        comm.close()
    elif mode == "torchrun":
        comm = make_comm(env)
        result["torch"] = exercise(comm, env)
        comm.close()
        result["destroyed"] = not torch.distributed.is_initialized()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()

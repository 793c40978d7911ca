"""One rank of the 2-rank dual-scope check: `mpiexec -n 2 python clip_parallel_worker.py {mpi|torch} OUT_DIR`.

Both ranks build the same attention weights and the same whole sequence (seeded), keep their own run of it, and
run DualScopeAttention over the real Comm (mpi4py, or torch.distributed gloo brought up through MPI). Each writes
OUT_DIR/rank{N}.pt: its output rows for every case, and the bytes it sent at 1x and 2x the video length.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from hpcvid.dist import Env, make_comm  # noqa: E402
from hpcvid.models.layers import Attention  # noqa: E402
from hpcvid.parallel.clip_parallel import ClipParallel, DualScope, DualScopeAttention  # noqa: E402

T = 4                      # frames per window
RUNS = [12, 8]             # frames per rank: unequal on purpose
CASES = {                  # name: (scope, t)
    "noisy": (DualScope(local_frames=3, global_frames=4, bias=2.0, global_until=0.2), 0.1),
    "late_scaled": (DualScope(local_frames=5, global_frames=2, bias=2.0, global_until=0.2, length_scaling=True), 0.9),
    "everything": (DualScope(local_frames=100, global_frames=0), 0.5),
}


def main(backend, out_dir):
    env = Env.discover()
    comm = make_comm(env, backend)
    torch.manual_seed(0)
    att = Attention(16, heads=2, head_dim=8)
    seq = torch.randn(5, sum(RUNS), 16)                                       # (R, N, C): the whole video
    start = sum(RUNS[:comm.rank])
    mine = seq[:, start:start + RUNS[comm.rank]]                              # (R, L, C)
    n = mine.shape[1] // T
    rows = mine.reshape(5, n, T, 16).transpose(0, 1).reshape(n * 5, T, 16)    # window-major
    out = {}
    for name, (scope, t) in CASES.items():
        handle = ClipParallel(comm, scope, time=t)
        handle.begin(RUNS)
        with torch.no_grad():
            got = DualScopeAttention(att, handle)(rows)
        out[name] = got.view(n, 5, T, 16).transpose(0, 1).reshape(5, n * T, 16)
        out[name + "_bytes"] = handle.stats.bytes_sent
    for scale in (1, 2):                                                      # bytes sent vs video length
        handle = ClipParallel(comm, CASES["noisy"][0], time=0.1)
        handle.begin([r * scale for r in RUNS])
        longer = torch.randn(5 * n * scale, T, 16)
        with torch.no_grad():
            DualScopeAttention(att, handle)(longer)
        out[f"bytes_x{scale}"] = handle.stats.bytes_sent
    torch.save(out, Path(out_dir) / f"rank{comm.rank}.pt")
    comm.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

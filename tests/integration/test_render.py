"""Clip-parallel rendering over real MPI ranks: dual-scope attention across 2 ranks against its single-process
statement, and the render stage end to end (mpiexec, segments, join read back with PyAV, resume, prompt files)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))      # helpers, also under --import-mode=importlib
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest's child_env
from clip_parallel_worker import CASES, RUNS, T  # noqa: E402
from conftest import child_env  # noqa: E402
from dual_scope_reference import reference_dual_scope  # noqa: E402

from hpcvid.models.layers import Attention  # noqa: E402

WORKER = Path(__file__).with_name("clip_parallel_worker.py")


@pytest.mark.parametrize("backend", ["mpi", "torch"])
def test_dual_scope_over_two_ranks_equals_the_single_process_statement(tmp_path, mpiexec, backend):
    res = subprocess.run([str(mpiexec), "-n", "2", sys.executable, str(WORKER), backend, str(tmp_path)],
                         env=child_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)                                    # the worker's weights and sequence
    att = Attention(16, heads=2, head_dim=8)
    seq = torch.randn(5, sum(RUNS), 16)
    for name, (scope, t) in CASES.items():
        got = torch.cat([ranks[0][name], ranks[1][name]], dim=1)             # (R, N, C)
        with torch.no_grad():
            want = reference_dual_scope(att, seq, RUNS, scope.local_frames, scope.global_frames, scope.bias,
                                        scope.global_until, t, window=T, length_scaling=scope.length_scaling)
        assert torch.allclose(got, want, atol=1e-5), name
    with torch.no_grad():                                   # p covers everything, no global frames: full attention
        assert torch.allclose(torch.cat([ranks[0]["everything"], ranks[1]["everything"]], dim=1), att(seq),
                              atol=1e-5)
    for rank in ranks:                                      # bytes per call do not grow with the video
        assert rank["bytes_x1"] == rank["bytes_x2"] > 0

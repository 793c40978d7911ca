"""Clip-parallel dual-scope attention on one rank (the 2-rank runs are in tests/integration/test_render.py): layout
helpers, the key sets against a plain per-frame statement of them, full attention as the limit, the DiT wrapped."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from dual_scope_reference import reference_dual_scope  # noqa: E402

from hpcvid.dist import LocalComm  # noqa: E402
from hpcvid.models.dit import DIT_PRESETS, DiT  # noqa: E402
from hpcvid.models.layers import Attention  # noqa: E402
from hpcvid.parallel.clip_parallel import (ClipParallel, DualScope, DualScopeAttention, clip_parallel,  # noqa: E402
                                           from_windows, split_runs, to_windows, uniform_picks)


def test_split_runs_and_picks():
    assert split_runs(9, 2) == [(0, 5), (5, 9)]
    assert split_runs(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="at least one"):
        split_runs(1, 2)
    assert uniform_picks(12, 3) == [2, 6, 10]
    assert uniform_picks(5, 5) == [0, 1, 2, 3, 4]


def test_to_windows_is_window_major_and_inverts():
    x = torch.arange(2 * 3 * 12 * 2 * 2, dtype=torch.float32).view(2, 3, 12, 2, 2)
    w = to_windows(x, 3)                                   # (3*2, 3, 4, 2, 2)
    assert w.shape == (6, 3, 4, 2, 2)
    assert torch.equal(w[1], x[1, :, 0:4]) and torch.equal(w[2], x[0, :, 4:8])   # window 1, batch 0 is row 2
    assert torch.equal(from_windows(w, 3), x)


def windows_of(seq, n):
    """(R, n*T, C) -> the (n*R, T, C) window-major rows a DiT block hands its temporal module."""
    R, L, C = seq.shape
    return seq.view(R, n, L // n, C).transpose(0, 1).reshape(n * R, L // n, C)


def sequence_of(rows, n):
    nR, T, C = rows.shape
    return rows.view(n, nR // n, T, C).transpose(0, 1).reshape(nR // n, n * T, C)


def one_rank(scope, seq, T, t):
    torch.manual_seed(0)
    att = Attention(16, heads=2, head_dim=8)
    handle = ClipParallel(LocalComm(), scope)
    handle.begin([seq.shape[1]])
    handle.time = t
    with torch.no_grad():
        got = sequence_of(DualScopeAttention(att, handle)(windows_of(seq, seq.shape[1] // T)), seq.shape[1] // T)
    return att, got, handle


def test_a_window_covering_everything_without_global_frames_is_full_attention():
    seq = torch.randn(6, 12, 16)
    att, got, _ = one_rank(DualScope(local_frames=100, global_frames=0), seq, T=4, t=0.5)
    with torch.no_grad():
        assert torch.allclose(got, att(seq), atol=1e-5)


@pytest.mark.parametrize("t", [0.05, 0.7])            # noisy phase (global keys biased) and after it
@pytest.mark.parametrize("scaling", [False, True])
def test_key_sets_match_the_per_frame_statement(t, scaling):
    seq = torch.randn(5, 16, 16)
    scope = DualScope(local_frames=3, global_frames=4, bias=2.0, global_until=0.2, length_scaling=scaling)
    att, got, handle = one_rank(scope, seq, T=4, t=t)
    with torch.no_grad():
        want = reference_dual_scope(att, seq, [16], 3, 4, 2.0, 0.2, t, window=4, length_scaling=scaling)
    assert torch.allclose(got, want, atol=1e-5)
    assert handle.stats.bytes_sent == 0               # nobody to talk to


class ReferenceTemporal(nn.Module):
    def __init__(self, attention, windows, **scope):
        super().__init__()
        self.attention, self.windows, self.scope = attention, windows, scope

    def forward(self, h):
        seq = sequence_of(h, self.windows)
        out = reference_dual_scope(self.attention, seq, [seq.shape[1]], window=h.shape[1], **self.scope)
        return windows_of(out, self.windows)


def test_the_dit_takes_its_windows_as_a_batch_and_only_temporal_attention_changes():
    """The DiT over 3 windows of 2 keyframes (a batch of 3), clip-parallel, equals the same DiT whose temporal
    attention is the per-frame statement over the 6-frame sequence; and differs from the plain DiT per window."""
    torch.manual_seed(0)
    model = DiT(DIT_PRESETS["keyframe-tiny"]).eval()
    for param in model.parameters():                  # leave the zero-initialised (identity) state
        nn.init.normal_(param, std=0.05)
    reference = copy.deepcopy(model)
    scope = dict(local_frames=1, global_frames=2, bias=1.0, global_until=0.2, t=0.5)
    reference.replace_temporal_attention(lambda name, module: ReferenceTemporal(module, 3, **scope))
    x, t = torch.randn(3, 3, 2, 16, 16), torch.full((3,), 0.5)
    text, mask = torch.randn(3, 5, 384), torch.ones(3, 5, dtype=torch.bool)
    with torch.no_grad():
        plain = model(x, t, text, mask)
        handle = clip_parallel(model, LocalComm(), DualScope(local_frames=1, global_frames=2, bias=1.0))
        handle.begin([6])
        handle.time = 0.5
        got = model(x, t, text, mask)
        want = reference(x, t, text, mask)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the windows see each other


def test_refuses_models_that_mix_frames_elsewhere():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(2, 4)
            self.conv = nn.Conv3d(4, 4, kernel_size=(3, 1, 1))

        def replace_temporal_attention(self, make):
            raise AssertionError("must refuse first")

    with pytest.raises(ValueError, match=r"norm \(GroupNorm.*conv \(Conv3d with temporal kernel 3\)"):
        clip_parallel(Mixed(), LocalComm(), DualScope())
    with pytest.raises(ValueError, match="local_frames"):
        DualScope(local_frames=-1)

"""A slow, plain single-process statement of dual-scope attention (METHODS.md §4), to test the clip-parallel one
against: for every frame of the whole sequence, its key set is written out, frame by frame.

Local keys of frame f (on rank r): frames within +-p of f that lie on rank r or its two neighbours. Global keys:
each rank's g frames at the centres of g equal parts of its run. Logits q.k / sqrt(d) (q scaled by log(keys) /
log(T) with length scaling) + bias on the global keys while t < global_until, on the local keys after.
"""
import math

import torch


def reference_dual_scope(att, seq, runs, local_frames, global_frames, bias, global_until, t, window,
                         length_scaling=False):
    """seq (R, N, C): the whole sequence; runs: frames per rank (sum N) -> (R, N, C)."""
    R, N, C = seq.shape
    H, d = att.heads, att.head_dim
    world = len(runs)
    starts = [sum(runs[:r]) for r in range(world)]
    rank_of = [r for r in range(world) for _ in range(runs[r])]
    g = 0 if global_frames == 0 else min(max(1, global_frames // world), min(runs))
    glob = [starts[r] + int((i + 0.5) * runs[r] / g) for r in range(world) for i in range(g)]
    q = att.to_q(seq).view(R, N, H, d).transpose(1, 2)                     # (R, H, N, d)
    k, v = att.to_kv(seq).view(R, N, 2, H, d).permute(2, 0, 3, 1, 4)       # (R, H, N, d) each
    noisy = t < global_until
    out = torch.zeros(R, H, N, d, dtype=seq.dtype)
    for f in range(N):
        local = [j for j in range(N) if abs(j - f) <= local_frames and abs(rank_of[j] - rank_of[f]) <= 1]
        keys = local + glob
        b = torch.tensor([0.0 if noisy else bias] * len(local) + [bias if noisy else 0.0] * len(glob))
        qf = q[:, :, f]                                                    # (R, H, d)
        if length_scaling and window > 1:
            qf = qf * (math.log(len(keys)) / math.log(window))
        logits = torch.einsum("rhd,rhkd->rhk", qf, k[:, :, keys]) / math.sqrt(d) + b
        out[:, :, f] = torch.einsum("rhk,rhkd->rhd", logits.softmax(-1), v[:, :, keys])
    return att.proj(out.transpose(1, 2).reshape(R, N, H * d))

"""Video-Infinity clip parallelism for the DiT's temporal attention (METHODS.md §4), applied from outside the model.

A long sequence of frames (the keyframe video, or the motion latents of many clips) is split along time into one
contiguous run per rank, and every run into windows of the length the model was trained on; the DiT sees a rank's
windows as a batch, window-major: x (B, C, n*T, H, W) -> `to_windows` -> (n*B, C, T, H, W). Spatial attention,
cross-attention and the MLPs then run per window as in training; only the temporal attention spans windows and
ranks, as dual-scope attention over the whole sequence:

  local scope   every frame attends to the frames within +-p of it (p = local_frames): the last p frames of the
                left rank and the first p of the right rank arrive as keys and values; the ends have no neighbour
                there (masked out, where Video-Infinity pads zeros);
  global scope  every rank picks g = global_frames / world frames at a uniform stride over its run (at least 1);
                all ranks gather them, and every frame attends to all of them;
  mixing        +bias on the logits of the global keys while t < global_until (the noisy phase: t = 0 is noise in
                our flow, METHODS' "t >= 800 of 1000"), on the local keys after it; optionally each query's logits
                scaled by log(its keys) / log(window length), the key count the model was trained with.

Per temporal layer and model call a rank sends the keys and values of 2p + g frames, whatever the video's length
(`ClipParallel.stats` counts bytes and seconds). Three rounds, each rank talking to one peer per round: all-gather
the global frames; odd ranks swap boundaries with rank + 1 (pairs 1-2, 3-4, ...); even ranks with rank + 1 (0-1,
2-3, ...). They are posted non-blocking right after the keys and values are projected, and travel while the rank
computes its queries and the logits against its own frames; the softmax then runs once over all keys. Attention
is computed window by window against that window's +-p neighbourhood and the global frames, so memory grows with
a rank's frames, never with the whole video's.

    handle = clip_parallel(model, comm, DualScope(local_frames=8, global_frames=16))
    handle.begin(run_frames)                 # frames (model time steps) of every rank's run, for one video
    handle.time = t                          # before each model call: the sampler's t in [0, 1]
    v = from_windows(model(to_windows(x, n), t, ...), n)

The DiT has no temporal convolution and no norm whose statistics mix frames (its LayerNorms are per token), so
nothing else needs neighbours; `clip_parallel` refuses a model that has such layers rather than compute something
silently different from the unsplit model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from hpcvid.dist import Comm, Pending

NEG_INF = float("-inf")
PAPER_LOCAL_FRAMES = 8          # METHODS.md §4: p
PAPER_GLOBAL_FRAMES = 16        # METHODS.md §4: k, over all ranks
PAPER_BIAS = 10.0               # METHODS.md §4: b
PAPER_GLOBAL_UNTIL = 0.2        # METHODS.md §4: diffusion t >= 800 of 1000 is flow t <= 0.2 (t = 0 noise here)


@dataclass(frozen=True)
class DualScope:
    """The dual-scope attention's settings (METHODS.md §4); frames are the model's time steps."""
    local_frames: int = PAPER_LOCAL_FRAMES
    global_frames: int = PAPER_GLOBAL_FRAMES
    bias: float = PAPER_BIAS
    global_until: float = PAPER_GLOBAL_UNTIL
    length_scaling: bool = False

    def __post_init__(self):
        for key in ("local_frames", "global_frames"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DualScope.{key} must be an int >= 0, got {value!r}")
        if not math.isfinite(self.bias) or not 0.0 <= self.global_until <= 1.0:
            raise ValueError(f"DualScope: bias must be finite and global_until in [0, 1], got {self.bias}, "
                             f"{self.global_until}")


# ---------------------------------------------------------------------------------------------------- layout

def split_runs(units: int, world: int) -> list[tuple[int, int]]:
    """[start, stop) of each rank's contiguous share of `units` (sizes differ by at most one, the larger first)."""
    if world < 1 or units < world:
        raise ValueError(f"cannot split {units} units over {world} ranks: every rank needs at least one")
    base, extra = divmod(units, world)
    bounds, start = [], 0
    for r in range(world):
        stop = start + base + (r < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def uniform_picks(frames: int, count: int) -> list[int]:
    """`count` frame indices at a uniform stride over `frames` frames: the centres of `count` equal parts."""
    return [int((i + 0.5) * frames / count) for i in range(count)]


def to_windows(x: torch.Tensor, windows: int) -> torch.Tensor:
    """(B, C, n*T, ...) -> (n*B, C, T, ...), window-major: the batch the clip-parallel model expects."""
    B, C, L = x.shape[:3]
    if L % windows:
        raise ValueError(f"to_windows: {L} frames do not split into {windows} windows")
    parts = x.reshape(B, C, windows, L // windows, *x.shape[3:])           # (B, C, n, T, ...)
    return parts.movedim(2, 0).reshape(windows * B, C, L // windows, *x.shape[3:])   # (n B, C, T, ...)


def from_windows(x: torch.Tensor, windows: int) -> torch.Tensor:
    """The inverse of `to_windows`: (n*B, C, T, ...) -> (B, C, n*T, ...)."""
    nB, C, T = x.shape[:3]
    parts = x.reshape(windows, nB // windows, C, T, *x.shape[3:])           # (n, B, C, T, ...)
    return parts.movedim(0, 2).reshape(nB // windows, C, windows * T, *x.shape[3:])


# ---------------------------------------------------------------------------------------------------- the handle

@dataclass
class CommStats:
    seconds: float = 0.0        # waiting in the exchanges (communication and the skew between ranks)
    bytes_sent: int = 0


@dataclass
class ClipParallel:
    """What the dual-scope layers of one model share: the comm, the settings, this video's layout and the time."""
    comm: Comm
    scope: DualScope
    time: float = 1.0
    run_frames: tuple[int, ...] = ()
    stats: CommStats = field(default_factory=CommStats)

    def begin(self, run_frames: Sequence[int]) -> None:
        """Set the frames of every rank's run (the same list on every rank) before a video's model calls."""
        runs = tuple(int(n) for n in run_frames)
        if len(runs) != self.comm.world_size or min(runs) < 1:
            raise ValueError(f"ClipParallel.begin: need one positive run length per rank ({self.comm.world_size}), "
                             f"got {runs}")
        self.run_frames = runs

    def halo(self, rank: int) -> int:
        """Frames `rank` sends to each neighbour: p, or its whole run when that is shorter (a window reaches no
        further than the next rank)."""
        return min(self.scope.local_frames, self.run_frames[rank])

    @property
    def picks_per_rank(self) -> int:
        """g: global frames each rank contributes (equal on all ranks, so that they can be gathered at once)."""
        if self.scope.global_frames == 0:
            return 0
        return min(max(1, self.scope.global_frames // self.comm.world_size), min(self.run_frames))

    def start(self, kv: torch.Tensor) -> Callable[[], tuple]:
        """Post the three rounds for kv (2, R, H, L, d) without waiting, and return finish() -> (global keys and
        values (2, R, H, world*g, d) in time order or None, left halo, right halo): the left rank's last frames and
        the right rank's first ones (`halo` of each), None where there is no such rank.

        Round 1 gathers every rank's g uniform picks; round 2 pairs odd ranks with rank + 1, round 3 even ranks
        with rank + 1. Posted non-blocking, they travel together while the caller computes; the seconds counted
        are those spent posting and waiting."""
        comm, rank, world = self.comm, self.comm.rank, self.comm.world_size
        start = time.perf_counter()
        g, mine = self.picks_per_rank, self.halo(self.comm.rank)
        gathered = None
        if g:
            picks = kv[..., uniform_picks(kv.shape[-2], g), :].contiguous()           # (2, R, H, g, d)
            gathered = comm.start_all_gather(picks) if world > 1 else Pending(lambda: picks[None])
            self.stats.bytes_sent += picks.numel() * picks.element_size() if world > 1 else 0
        halos = {}
        for round_parity in (1, 0) if mine and world > 1 else ():
            for side, peer, part in (("right", rank + 1, kv[..., -mine:, :]), ("left", rank - 1, kv[..., :mine, :])):
                if (side == "right") == (rank % 2 == round_parity) and 0 <= peer < world:
                    out = kv.new_empty(*kv.shape[:3], self.halo(peer), kv.shape[-1])
                    halos[side] = comm.start_exchange(part.contiguous(), peer, out)
                    self.stats.bytes_sent += part.numel() * part.element_size()
        talks = world > 1                              # one rank: nothing to count
        self.stats.seconds += (time.perf_counter() - start) * talks

        def finish() -> tuple:
            waited = time.perf_counter()
            glob = None if gathered is None else gathered.wait().permute(1, 2, 3, 0, 4, 5).flatten(3, 4)
            left, right = (halos[side].wait() if side in halos else None for side in ("left", "right"))
            self.stats.seconds += (time.perf_counter() - waited) * talks
            return glob, left, right

        return finish


# ---------------------------------------------------------------------------------------------------- attention

class DualScopeAttention(nn.Module):
    """Replaces a DiT block's temporal attention, with the same weights (its q, kv and output projections).

    Called as the block calls its temporal module: h (n*R, T, C), window-major rows (R = B * h * w), and returns
    the attention output of the same shape.
    """

    def __init__(self, attention: nn.Module, handle: ClipParallel):
        super().__init__()
        self.attention = attention          # keeps the parameter names under .attention (state dicts: use the model's)
        self.handle = handle

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        cp, att = self.handle, self.attention
        if not cp.run_frames:
            raise RuntimeError("DualScopeAttention: call ClipParallel.begin(run_frames) before the model")
        rows, T, C = h.shape
        L = cp.run_frames[cp.comm.rank]
        n = L // T
        if n * T != L or rows % n:
            raise ValueError(f"DualScopeAttention: this rank's run is {L} frames, the model got windows of {T} "
                             f"frames and {rows} rows; the run must be whole windows (to_windows(x, {L // T or 1}))")
        R, Hh, d = rows // n, att.heads, att.head_dim
        seq = h.view(n, R, T, C).transpose(0, 1).reshape(R, L, C)                   # (R, L, C): frames in order
        kv = att.to_kv(seq).view(R, L, 2, Hh, d).permute(2, 0, 3, 1, 4)              # (2, R, H, L, d)
        finish = cp.start(kv)                          # the border and global frames travel while we compute

        # this run's keys: window w's queries against its frames +-p (frames outside the run come in `finish`)
        q = att.to_q(seq).view(R, L, Hh, d).transpose(1, 2).reshape(R, Hh, n, T, d)  # (R, H, n, T, d)
        p = min(cp.scope.local_frames, L - 1)
        pad = kv.new_zeros(*kv.shape[:3], p, d)
        own = torch.cat([pad, kv, pad], dim=3).unfold(3, T + 2 * p, T).transpose(-1, -2)   # (2, R, H, n, T+2p, d)
        logits = [q @ own[0].transpose(-1, -2) / math.sqrt(d)]                       # (R, H, n, T, T + 2p)
        values = [own[1]]

        glob, left, right = finish()                   # the keys every window shares: halos, then global frames
        shared = [x for x in (left, right, glob) if x is not None]
        if shared:
            other = torch.cat(shared, dim=3)[:, :, :, None]                          # (2, R, H, 1, K_o, d)
            logits.append(q @ other[0].transpose(-1, -2) / math.sqrt(d))             # (R, H, n, T, K_o)
            values.append(other[1])
        hl, hr = (0 if x is None else x.shape[3] for x in (left, right))
        bias, counts = self._bias(n, T, p, L, hl, hr, 0 if glob is None else glob.shape[3], q.device)
        logits = torch.cat(logits, dim=-1)                                           # (R, H, n, T, K)
        if cp.scope.length_scaling and T > 1:
            logits = logits * (counts.log() / math.log(T)).to(logits.dtype)[..., None]   # log(keys) / log(T)
        weights = torch.softmax(logits.float() + bias, dim=-1).to(kv.dtype)          # (R, H, n, T, K)
        split = list(weights.split([v.shape[-2] for v in values], dim=-1))
        out = sum(w @ v for w, v in zip(split, values))                              # (R, H, n, T, d)
        out = out.permute(2, 0, 3, 1, 4).reshape(n * R, T, Hh * d)                   # (n R, T, H d): window-major
        return att.proj(out)                                                         # (n R, T, C)

    def _bias(self, n: int, T: int, p: int, L: int, hl: int, hr: int, G: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive logits (n, T, K) in the key order of `forward` (own block, left halo, right halo, global) and
        each query's key count (n, T).

        Query i of window w is run frame w*T + i. Own key j of window w is run frame w*T + j - p, a key when it lies
        in the run; halo keys are run frames -hl .. -1 and L .. L + hr - 1. A local key counts when it is within
        local_frames of the query; global keys always count.
        """
        cp = self.handle
        query = (torch.arange(n, device=device)[:, None] * T + torch.arange(T, device=device)[None])[..., None]
        own = torch.arange(n, device=device)[:, None, None] * T + torch.arange(T + 2 * p, device=device) - p
        halo = torch.cat([torch.arange(-hl, 0, device=device), torch.arange(L, L + hr, device=device)])
        near = torch.cat([((own - query).abs() <= cp.scope.local_frames) & (own >= 0) & (own < L),
                          (halo - query).abs() <= cp.scope.local_frames], dim=-1)          # (n, T, T + 2p + hl + hr)
        noisy = cp.time < cp.scope.global_until
        local = torch.where(near, 0.0 if noisy else cp.scope.bias, NEG_INF)
        glob = torch.full((n, T, G), cp.scope.bias if noisy else 0.0, device=device)
        return torch.cat([local, glob], dim=-1), near.sum(-1).float() + G


# ---------------------------------------------------------------------------------------------------- applying it

def _frame_mixing_layers(model: nn.Module) -> list[str]:
    """Layers that would need neighbour frames or cross-rank statistics, which this module does not provide."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            found.append(f"{name} ({type(module).__name__}: statistics over frames)")
        elif isinstance(module, nn.Conv3d) and module.kernel_size[0] > 1:
            found.append(f"{name} (Conv3d with temporal kernel {module.kernel_size[0]})")
    return found


def clip_parallel(model: nn.Module, comm: Comm, scope: DualScope) -> ClipParallel:
    """Install dual-scope attention as every temporal attention of `model` (a DiT) and return the shared handle.

    Weights are untouched: load them before or after (the replacement holds the original module). Order with
    other wrappers: apply this first; it changes only which keys each temporal attention reads.
    """
    if not hasattr(model, "replace_temporal_attention"):
        raise TypeError(f"clip_parallel: {type(model).__name__} has no replace_temporal_attention(make)")
    mixing = _frame_mixing_layers(model)
    if mixing:
        raise ValueError("clip_parallel: these layers mix frames and are not split across ranks: "
                         + "; ".join(mixing))
    handle = ClipParallel(comm, scope)
    model.replace_temporal_attention(lambda name, module: DualScopeAttention(module, handle))
    return handle

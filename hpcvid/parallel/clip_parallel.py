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
(`ClipParallel.stats` counts bytes and seconds). Three rounds, each rank talking to one peer at a time: all-gather
the global frames; odd ranks swap boundaries with rank + 1 (pairs 1-2, 3-4, ...); even ranks with rank + 1 (0-1,
2-3, ...). Attention is computed window by window against that window's +-p neighbourhood and the global frames,
so memory grows with a rank's frames, never with the whole video's.

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
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hpcvid.dist import Comm

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
    calls: int = 0              # temporal-attention calls that exchanged


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

    def _timed_exchange(self, send: torch.Tensor, peer: int, shape: Sequence[int]) -> torch.Tensor:
        out = torch.empty(shape, dtype=send.dtype, device=send.device)
        start = time.perf_counter()
        self.comm.exchange_tensor(send, peer, out)
        self.stats.seconds += time.perf_counter() - start
        self.stats.bytes_sent += send.numel() * send.element_size()
        return out

    def neighbours(self, kv: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Rounds 2 and 3: (left halo, right halo) = the left rank's last frames and the right rank's first ones
        (`halo` of each), of kv (2, R, H, L, d) along L; None where there is no such rank."""
        rank, world = self.comm.rank, self.comm.world_size
        left = right = None
        mine = self.halo(rank)
        if mine == 0 or world == 1:
            return left, right
        for round_parity in (1, 0):                  # round 2: odd ranks pair with rank + 1; round 3: even ranks
            if rank % 2 == round_parity and rank + 1 < world:
                shape = (*kv.shape[:3], self.halo(rank + 1), kv.shape[-1])
                right = self._timed_exchange(kv[..., -mine:, :].contiguous(), rank + 1, shape)
            elif rank % 2 != round_parity and rank >= 1:
                shape = (*kv.shape[:3], self.halo(rank - 1), kv.shape[-1])
                left = self._timed_exchange(kv[..., :mine, :].contiguous(), rank - 1, shape)
        return left, right

    def global_keys(self, kv: torch.Tensor, g: int) -> Optional[torch.Tensor]:
        """Round 1: (2, R, H, world*g, d), every rank's g uniform picks in time order; None when g = 0."""
        if g == 0:
            return None
        mine = kv[..., uniform_picks(kv.shape[-2], g), :].contiguous()                # (2, R, H, g, d)
        start = time.perf_counter()
        gathered = self.comm.all_gather_tensor(mine) if self.comm.world_size > 1 else mine[None]
        self.stats.seconds += time.perf_counter() - start
        if self.comm.world_size > 1:
            self.stats.bytes_sent += mine.numel() * mine.element_size()
        return gathered.permute(1, 2, 3, 0, 4, 5).flatten(3, 4)                     # (2, R, H, world g, d)


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
        q = att.to_q(seq).view(R, L, Hh, d).transpose(1, 2)                          # (R, H, L, d)
        kv = att.to_kv(seq).view(R, L, 2, Hh, d).permute(2, 0, 3, 1, 4)              # (2, R, H, L, d)

        p, g = cp.scope.local_frames, cp.picks_per_rank
        glob = cp.global_keys(kv, g)                                                 # (2, R, H, G, d) or None
        left, right = cp.neighbours(kv)                                              # (2, R, H, <= p, d) or None
        hl, hr = (0 if x is None else x.shape[3] for x in (left, right))
        p = min(p, L - 1 + max(hl, hr))               # no key lies further away: pad no more than that
        parts = [kv.new_zeros(*kv.shape[:3], p - hl, d), left, kv, right, kv.new_zeros(*kv.shape[:3], p - hr, d)]
        padded = torch.cat([x for x in parts if x is not None], dim=3)               # (2, R, H, p + L + p, d)
        local = padded.unfold(3, T + 2 * p, T).transpose(-1, -2)                    # (2, R, H, n, T + 2p, d)
        keys = local if glob is None else torch.cat(
            [local, glob[:, :, :, None].expand(-1, -1, -1, n, -1, -1)], dim=4)       # (2, R, H, n, T + 2p + G, d)
        G = 0 if glob is None else glob.shape[3]
        bias, counts = self._bias(n, T, p, G, hl, hr, q.device)                      # (n, T, K), (n, T)

        q = q.view(R, Hh, n, T, d)                                                   # (R, H, n, T, d)
        if cp.scope.length_scaling and T > 1:
            q = q * (counts.log() / math.log(T)).to(q.dtype)[..., None]              # per query: log(keys)/log(T)
        out = F.scaled_dot_product_attention(q, keys[0], keys[1], attn_mask=bias.to(q.dtype))   # (R, H, n, T, d)
        out = out.permute(2, 0, 3, 1, 4).reshape(n * R, T, Hh * d)                   # (n R, T, H d): window-major
        return att.proj(out)                                                         # (n R, T, C)

    def _bias(self, n: int, T: int, p: int, G: int, hl: int, hr: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive logits (n, T, T + 2p + G) and each query's key count (n, T).

        Local key j of window w is padded frame w*T + j, i.e. run frame w*T + j - p; query i is run frame w*T + i.
        It is a key when |j - p - i| <= p and the frame exists: run frames -hl .. L + hr - 1, with hl / hr the halos
        received (0 at an end of the video, where the padding is zeros).
        """
        cp = self.handle
        L = n * T
        i = torch.arange(T, device=device)[:, None]                                  # (T, 1)
        j = torch.arange(T + 2 * p, device=device)[None, :]                          # (1, T + 2p)
        frame = torch.arange(n, device=device)[:, None, None] * T + j[None] - p      # (n, 1, T + 2p): run frame
        near = ((j - p - i).abs() <= p)[None]                                        # (1, T, T + 2p)
        exists = (frame >= -hl) & (frame < L + hr)                                   # (n, 1, T + 2p)
        allowed = near & exists                                                      # (n, T, T + 2p)
        noisy = cp.time < cp.scope.global_until
        local = torch.where(allowed, 0.0 if noisy else cp.scope.bias, NEG_INF)       # (n, T, T + 2p)
        glob = torch.full((n, T, G), cp.scope.bias if noisy else 0.0, device=device)
        counts = allowed.sum(-1).float() + G                                         # (n, T)
        return torch.cat([local, glob], dim=-1), counts


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

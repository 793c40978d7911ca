"""The decoders behind `VideoReader`: decord's fast random access, checked against PyAV's timestamps.

Why the checking: decord has lied to us in two ways that looked fine on the machine the code was written on.
On AVX-512 CPUs decord2 3.3/3.4 decodes small widths (8-48, 96, 144 px) with a wrong channel count, e.g. (32, 32, 6).
In files whose index lies (an AVI with wrong keyframe flags, x264 in AVI without timestamps) it seeks to a frame
that is not a keyframe, or lands elsewhere than it believes, and then counts frames from there: it returns frames
from the wrong positions (frame 100 came back as frame 10) without any error. So:

- `ContainerIndex` reads the container's packets with PyAV (no decoding, about as cheap as decord's own open): the
  presentation timestamps of the video packets, sorted, number the frames (frame i has the i-th smallest pts).
- `DecordSource` is the fast path. With every batch it also decodes the keyframes it seeks from (its "anchors").
- `PyAVSource.decode_at` is the check: it seeks by timestamp and trusts the result only when a real keyframe (an
  intra picture marked key) at or before the target comes out first and the target's timestamp is then reached.
  `VideoReader` compares decord's anchors (and the last frame of the file, where frame counts disagree) with it.
- `PyAVSource.get` is the slow sure path: it decodes in order from the start, places each frame by its timestamp
  and never trusts the index's keyframe flags.

What the anchor check does not see: a frame dropped inside a group of pictures after a correct seek (a corrupt
packet) would shift decord's count until its next seek. decord normally raises on such packets; the last frame of
the file is always checked when asked for. Anything that fails a check raises `Untrusted`; the reader then falls
back to the sure path, and reports the video as failed when that cannot place its frames either.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np

# at most this many frames are decoded after a seek before the seek counts as lost (a GOP is rarely > 300 frames)
MAX_FRAMES_AFTER_SEEK = 2000
# mean absolute difference (grey levels) above which two decodes of "the same" frame are different frames; both
# decoders use ffmpeg underneath and agreed exactly on every good file tried; wrong positions differed by 10-55
SAME_FRAME_TOLERANCE = 1.0

_DECORD_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


class VideoError(Exception):
    """A video that cannot be used; `reason` is a short machine-readable code, str(e) a one-line human detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # custom __init__ args: without this the error cannot travel back from a worker process
        return (type(self), (self.reason, self.detail))


class Untrusted(Exception):
    """A decoder returned something that cannot be shown to be the frame that was asked for."""


def one_line(exc: BaseException) -> str:
    """decord errors carry multi-line C++ traces; keep the first line, shortened."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = _DECORD_LOG_PREFIX.sub("", text)
    return f"{type(exc).__name__}: {text[:200]}"


# ---------------------------------------------------------------------------------------------------- the index

@dataclass(frozen=True)
class ContainerIndex:
    """What the container says about its video stream, read without decoding."""
    path: str
    num_frames: int                      # video packets that hold data
    fps: float
    height: int
    width: int
    time_base: Fraction
    pts: Optional[tuple[int, ...]]       # sorted packet timestamps; None when some are missing or repeated

    @classmethod
    def read(cls, path: str) -> "ContainerIndex":
        import av

        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise VideoError("unreadable", f"no video stream in {path}")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                fps = float(rate) if rate else 0.0
                height, width = stream.codec_context.height, stream.codec_context.width
                time_base = stream.time_base or Fraction(1, 1)
                # empty packets are flushes; discard-flagged ones (before an mp4 edit list starts) never show
                stamps = [p.pts for p in container.demux(stream) if p.size > 0 and not p.is_discard]
        except VideoError:
            raise
        except Exception as exc:  # av.FFmpegError subclasses, OSError
            raise VideoError("unreadable", f"PyAV cannot open {path}: {one_line(exc)}") from None
        if not stamps:
            raise VideoError("unreadable", f"video stream of {path} has no frames")
        if height <= 0 or width <= 0:
            raise VideoError("unreadable", f"video stream of {path} has no frame size")
        if not (math.isfinite(fps) and fps > 0):
            raise VideoError("unreadable", f"no usable frame rate ({fps}) in {path}")
        usable = None not in stamps and len(set(stamps)) == len(stamps)
        return cls(path, len(stamps), fps, int(height), int(width), Fraction(time_base),
                   tuple(sorted(stamps)) if usable else None)

    def seconds(self, frame: int) -> Optional[float]:
        """Presentation time of a frame, or None when the container gives no usable timestamps."""
        return None if self.pts is None else float((self.pts[frame] - self.pts[0]) * self.time_base)


def is_real_keyframe(frame) -> bool:
    """An intra picture that the decoder itself marks as a keyframe (a packet flag alone proves nothing)."""
    from av.video.frame import PictureType

    return bool(frame.key_frame) and frame.pict_type in (PictureType.I, PictureType.SI)   # PyAV gives an int


# ---------------------------------------------------------------------------------------------------- PyAV

class PyAVSource:
    """PyAV: in-order decoding placed by timestamps (the sure path) and single frames by verified seeks."""

    name = "pyav"

    def __init__(self, index: ContainerIndex, num_threads: int):
        self.index, self.num_threads = index, num_threads
        self._position = {p: i for i, p in enumerate(index.pts)} if index.pts is not None else None
        self._container, self._frames, self._last, self._count = None, None, -1, 0
        self._seeker = None             # a second container for decode_at, kept between checks

    def get(self, indices: list[int]) -> np.ndarray:
        """Decode forward from the start (or from where the last call stopped) to the wanted frames."""
        wanted = set(indices)
        if self._frames is None or min(wanted) <= self._last:
            self._restart()
        found, h, w = {}, self.index.height, self.index.width
        try:
            while self._last < max(wanted):
                frame = next(self._frames, None)
                if frame is None:
                    break
                position = self._place(frame)
                if position <= self._last:
                    raise Untrusted(f"decoded frames of {self.index.path} go back in time (frame {position} after "
                                    f"{self._last}): their positions cannot be trusted")
                self._last = position
                if position in wanted:
                    # reformat also guards against a mid-stream size change
                    found[position] = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()  # (H, W, 3)
        except Exception:
            self.close()  # decoder state unknown: the next call starts over
            raise
        if self._position is None:
            self._count_to_the_end()
        missing = sorted(wanted - found.keys())
        if missing:
            last = self._last
            self.close()
            raise RuntimeError(f"stream ended after frame {last}; frame {missing[0]} never came")
        return np.stack([found[i] for i in indices])  # (N, H, W, 3)

    def _count_to_the_end(self) -> None:
        """Without timestamps, a frame's position is its count: only right if the decoder dropped none, which only
        the total can show (decodes the rest of the file; such files are rare: raw streams, broken indexes)."""
        while next(self._frames, None) is not None:
            self._count += 1
        decoded = self._count
        self.close()
        if decoded != self.index.num_frames:
            raise Untrusted(f"{self.index.path} has no usable timestamps and decodes to {decoded} frames where the "
                            f"container lists {self.index.num_frames}: positions cannot be trusted")

    def _place(self, frame) -> int:
        """A decoded frame's index: by its timestamp when the container has usable ones, else by count."""
        self._count += 1
        if self._position is None:
            return self._count - 1
        position = self._position.get(frame.pts)
        if position is None:
            raise Untrusted(f"a decoded frame of {self.index.path} has timestamp {frame.pts}, which no packet of the "
                            f"container has: its position cannot be trusted")
        return position

    def decode_at(self, frame_index: int) -> np.ndarray:
        """One frame by seeking, trusted only if decoding starts at a real keyframe at or before it."""
        import av

        if self.index.pts is None:
            raise Untrusted(f"{self.index.path} has no usable timestamps: a seek cannot be checked")
        target = self.index.pts[frame_index]
        if self._seeker is None:        # one container for every check of this reader: opening one costs ~2 ms
            self._seeker = av.open(self.index.path)
        container = self._seeker
        stream = container.streams.video[0]
        container.seek(target, stream=stream, backward=True, any_frame=False)
        started = False
        for n, frame in enumerate(container.decode(stream)):
            if n > MAX_FRAMES_AFTER_SEEK or frame.pts is None:
                break
            if not started:
                if frame.pts > target:
                    raise Untrusted(f"a seek to frame {frame_index} of {self.index.path} landed after it "
                                    f"(timestamp {frame.pts} > {target}): the container's index is off")
                started = is_real_keyframe(frame)
                if not started and frame.pts == target:
                    raise Untrusted(f"no real keyframe at or before frame {frame_index} of {self.index.path} "
                                    f"after a seek: the index marks as keyframes frames that are not")
                if not started:
                    continue    # a leading frame decoded before any keyframe (open GOP): not trusted
            if frame.pts == target:
                return frame.reformat(width=self.index.width, height=self.index.height,
                                      format="rgb24").to_ndarray()  # (H, W, 3)
            if frame.pts > target:
                break
        raise Untrusted(f"frame {frame_index} of {self.index.path} never came after a seek to its timestamp")

    def _restart(self) -> None:
        import av

        self.close()
        self._container = av.open(self.index.path)
        stream = self._container.streams.video[0]
        if self.num_threads != 1:
            stream.thread_type, stream.thread_count = "AUTO", self.num_threads
        self._frames, self._last, self._count = self._container.decode(stream), -1, 0

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container, self._frames, self._last, self._count = None, None, -1, 0

    def close_all(self) -> None:
        self.close()
        if self._seeker is not None:
            self._seeker.close()
            self._seeker = None


# ---------------------------------------------------------------------------------------------------- decord

def _import_decord():
    """Import decord once and silence ffmpeg's stderr chatter: bad videos are reported as VideoError instead."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    return decord


class DecordSource:
    """decord: fast random access (it indexes all packets at open); its answers are checked by the reader."""

    name = "decord"

    def __init__(self, index: ContainerIndex, num_threads: int):
        decord = _import_decord()
        path = index.path
        try:
            self.vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
        except Exception as exc:  # RuntimeError, DECORDError, AssertionError (0 frames) all mean "cannot open"
            raise VideoError("unreadable", f"decord cannot open {path}: {one_line(exc)}") from None
        try:
            first = self.vr.next().asnumpy()  # (H, W, C); proves the stream decodes
        except Exception as exc:
            raise VideoError("undecodable_frames", f"decord cannot decode frame 0 of {path}: {one_line(exc)}") from None
        want = (index.height, index.width, 3)
        if first.shape != want:
            raise Untrusted(f"decord decodes {path} as {first.shape} frames, the stream is {want} (a decord bug "
                            f"on some CPUs with AVX-512 for small widths)")
        self.num_frames = len(self.vr)
        self.keyframes = sorted(int(k) for k in self.vr.get_key_indices())

    def anchors(self, indices: list[int]) -> set[int]:
        """The keyframes decord decodes from to reach `indices`: the last keyframe at or before each one."""
        import bisect

        found = set()
        for i in set(indices):
            k = bisect.bisect_right(self.keyframes, i) - 1
            found.add(self.keyframes[k] if k >= 0 else 0)
        return found

    def get(self, indices: list[int]) -> np.ndarray:
        return self.vr.get_batch(indices).asnumpy()  # uint8 (N, H, W, 3) RGB

    def close(self) -> None:
        self.vr = None

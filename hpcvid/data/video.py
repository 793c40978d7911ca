"""Video decode/encode for the pipeline: random-access reading, clip sampling, buckets, resizing, mp4 writing.

Every way a video can be unusable ends as a `VideoError` with a short reason code, so the prep stage can record
the video as bad data and go on. decord, PyAV and torch are imported lazily: importing this module stays cheap.

Frames are read through `VideoReader`, which checks decord's fast random access against the container's
timestamps and falls back to in-order decoding (hpcvid.data.decoders says how and why). What could not be trusted
and what looks unusual (variable frame rate, frame counts that disagree) is returned as notes, not hidden.

What the decoders do on bad input (decord2 3.4, PyAV 18.1; checked in subprocesses, neither crashed nor hung):
  missing path, zero-byte file, text named .mp4, mp4 cut before its index (moov at the end): both refuse to open.
  mp4 cut after its index (faststart): both open; the packets present are counted, and the last few frames they
  list fail to decode. Audio-only file: both open the container, neither finds a video stream.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from hpcvid.io import atomic_write_with
from hpcvid.data.decoders import (SAME_FRAME_TOLERANCE, ContainerIndex, DecordSource, PyAVSource, Untrusted,
                                  VideoError, one_line)

__all__ = ["BACKENDS", "LAYOUTS", "Clip", "VideoError", "VideoInfo", "VideoReader", "choose_bucket", "clip_span",
           "clip_starts", "frame_stride", "read_clips", "resize_center_crop", "write_mp4"]

BACKENDS = ("auto", "decord", "pyav")
LAYOUTS = ("spread", "consecutive")      # where a video's clips start: see clip_starts
# codecs that take a constant-rate-factor option (others get their defaults)
_CRF_CODECS = {"libx264", "libx265", "libvpx-vp9", "libsvtav1", "libaom-av1"}
# read_clips decodes at most this many bytes of raw RGB frames per get_frames call
_DECODE_CHUNK_BYTES = 512 * 2**20
# a clip whose frame rate measured from its timestamps differs from its nominal rate (source fps / stride) by more
# than this fraction is reported as variable-frame-rate (constant-rate files agree to rounding, < 0.1%)
VFR_TOLERANCE = 0.03


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int
    backend: str  # "decord" or "pyav": the decoder whose frames were returned last
    notes: tuple[tuple[str, str], ...] = ()   # (code, detail): what could not be trusted, or is unusual, and why


@dataclass
class Clip:
    start: int  # first frame index in the source video
    stride: int
    fps: float  # the clip's frame rate: from its timestamps when the container has them, else native_fps / stride
    bucket: tuple[int, int]
    frames: np.ndarray  # uint8 (T, h, w, 3)


class VideoReader:
    """Random access to frames, never trusted blindly: decord when it proves right, PyAV's sure path otherwise.

    backend "auto": decord, with every batch checked at its seek points against PyAV's timestamp-verified decode
    (see hpcvid.data.decoders); on any doubt the video is decoded in order with PyAV instead, and `info.notes` says
    why. "decord": the same checks, but a doubt raises VideoError("untrusted_frames"). "pyav": in-order PyAV only.
    A truncated mp4 often lists frames it does not hold: asking for them raises VideoError("undecodable_frames").
    """

    def __init__(self, path: str | Path, backend: str = "auto", num_threads: int = 1):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.path = str(path)
        self.backend = backend
        self.num_threads = num_threads
        if not os.path.exists(self.path):
            raise VideoError("missing_file", f"no such file: {self.path}")
        if not os.path.isfile(self.path):
            raise VideoError("unreadable", f"not a regular file: {self.path}")
        if os.path.getsize(self.path) == 0:
            raise VideoError("empty_file", f"zero-byte file: {self.path}")
        self.notes: list[tuple[str, str]] = []
        index = ContainerIndex.read(self.path)    # PyAV, no decoding: the timestamps every check relies on
        self._sure = PyAVSource(index, num_threads)
        self._fast = self._open_decord(index) if backend != "pyav" else None
        num_frames = index.num_frames
        self._counts_disagree = self._fast is not None and self._fast.num_frames != index.num_frames
        if self._counts_disagree:
            num_frames = min(self._fast.num_frames, index.num_frames)
            self.notes.append(("frame_count_mismatch", f"decord counts {self._fast.num_frames} frames, the container "
                                                       f"{index.num_frames}: using {num_frames}"))
        self.index = index
        self.info = VideoInfo(num_frames, index.fps, index.height, index.width,
                              "decord" if self._fast is not None else "pyav")

    def _open_decord(self, index: ContainerIndex) -> Optional[DecordSource]:
        try:
            return DecordSource(index, self.num_threads)
        except ImportError as exc:
            if self.backend == "decord":
                raise VideoError("unreadable", f"decord is not installed ({exc})") from None
            self.notes.append(("decoder_fallback", f"decord is not installed ({exc})"))
        except Untrusted as exc:
            if self.backend == "decord":
                raise VideoError("untrusted_frames", str(exc)) from None
            self.notes.append(("decoder_fallback", str(exc)))
        except VideoError as err:
            if self.backend == "decord":
                raise
            self.notes.append(("decoder_fallback", err.detail))
        return None

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        """Frames at `indices` (any order, repeats allowed) as uint8 (N, H, W, 3) RGB."""
        idx = [int(i) for i in indices]
        h, w = self.info.height, self.info.width
        if not idx:
            return np.empty((0, h, w, 3), np.uint8)
        bad = [i for i in idx if not 0 <= i < self.info.num_frames]
        if bad:
            raise IndexError(f"frame index {bad[0]} outside [0, {self.info.num_frames}) in {self.path}")
        if self._fast is not None:
            try:
                return self._checked_fast(idx)
            except MemoryError:
                raise  # the machine's problem, not the video's
            except Untrusted as exc:
                doubt = ("untrusted_frames", str(exc))
            except Exception as exc:
                doubt = ("undecodable_frames", f"decord: {one_line(exc)}")
            if self.backend == "decord":
                raise VideoError(doubt[0], f"cannot decode frames of {self.path}: {doubt[1]}")
            self.notes.append(("decoder_fallback", doubt[1]))
            self._fast.close()
            self._fast = None
            self.info = replace(self.info, backend=self._sure.name)
        try:
            return self._shape_checked(self._sure.get(idx), len(idx))
        except MemoryError:
            raise
        except Untrusted as exc:
            raise VideoError("untrusted_frames", f"cannot place frames of {self.path}: {exc}") from None
        except Exception as exc:
            raise VideoError("undecodable_frames", f"cannot decode frames of {self.path}: pyav: {one_line(exc)}") \
                from None

    def _checked_fast(self, idx: list[int]) -> np.ndarray:
        """decord's frames, once its seek points (and, when the frame counts disagree, the last frame) match PyAV's."""
        probes = self._fast.anchors(idx)
        if self._counts_disagree:    # then where decord's count ends is in doubt: its last frame may be a repeat
            probes |= {self.info.num_frames - 1} & set(idx)
        # the anchors that are not wanted come in a call of their own (keyframes: cheap), so that the wanted
        # frames need no copy into a new array (a batch of 720p frames is ~100 MB)
        extra = sorted(probes - set(idx))
        frames = self._shape_checked(self._fast.get(idx), len(idx))                    # (N, H, W, 3)
        others = self._shape_checked(self._fast.get(extra), len(extra)) if extra else None
        where = {f: frames[i] for i, f in enumerate(idx)}
        where.update({f: others[i] for i, f in enumerate(extra)})
        for p in sorted(probes):
            sure = self._sure.decode_at(p)                                              # (H, W, 3)
            diff = float(np.abs(where[p].astype(np.int16) - sure.astype(np.int16)).mean())
            if diff > SAME_FRAME_TOLERANCE:
                raise Untrusted(f"decord's frame {p} of {self.path} is not the frame at its timestamp (mean "
                                f"difference {diff:.1f} grey levels): its random access cannot be trusted here")
        return frames

    def _shape_checked(self, frames: np.ndarray, n: int) -> np.ndarray:
        want = (n, self.info.height, self.info.width, 3)
        if frames.shape != want or frames.dtype != np.uint8:
            raise Untrusted(f"decoder gave {frames.dtype} {frames.shape}, expected uint8 {want}")
        return frames

    def frame_seconds(self, frame: int) -> Optional[float]:
        """Presentation time of a frame from the container's timestamps (None when it has none)."""
        return self.index.seconds(frame)

    def close(self) -> None:
        self._sure.close_all()
        if self._fast is not None:
            self._fast.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def frame_stride(native_fps: float, target_fps: float | None) -> int:
    """How many source frames one clip step covers, so clips play at about target_fps."""
    if target_fps is None:
        return 1
    if not target_fps > 0:
        raise ValueError(f"target_fps must be > 0 or None, got {target_fps}")
    return max(1, round(native_fps / target_fps))


def clip_span(num_frames: int, stride: int) -> int:
    """Source frames from a clip's first frame to its last, inclusive."""
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride must be >= 1, got {num_frames}, {stride}")
    return (num_frames - 1) * stride + 1


def clip_starts(total_frames: int, span: int, clips_per_video: int, layout: str = "spread",
                stride: int = 1) -> list[int]:
    """Where a video's clips start.

    spread: evenly spaced over [0, total-span]; one clip sits in the middle (skips intros and outros): clips that
    show as much of the video as possible, for autoencoders.
    consecutive: back to back from frame 0, each where the previous clip's next frame step would land (starts 0,
    T*stride, 2*T*stride, ... with T*stride = span + stride - 1), at most clips_per_video while a whole clip fits:
    the video as a sequence of clips that continue each other, for the DiTs.
    """
    if clips_per_video < 1 or span < 1 or stride < 1:
        raise ValueError(f"clips_per_video, span and stride must be >= 1, got {clips_per_video}, {span}, {stride}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if total_frames < span:
        raise VideoError("too_short", f"{total_frames} frames, one clip needs {span}")
    last = total_frames - span
    if layout == "consecutive":
        return list(range(0, last + 1, span + stride - 1))[:clips_per_video]
    if clips_per_video == 1:
        return [last // 2]
    return sorted({round(k * last / (clips_per_video - 1)) for k in range(clips_per_video)})


def choose_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest in log space (so 2:1 and 1:2 are equally far from 1:1)."""
    if not buckets:
        raise ValueError("no buckets given")
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    target = math.log(height / width)
    best, best_dist = None, math.inf
    for bh, bw in buckets:
        dist = abs(math.log(bh / bw) - target)
        if dist < best_dist - 1e-12:  # strict: ties keep the first listed
            best, best_dist = (int(bh), int(bw)), dist
    return best


def resize_center_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale so the frame covers `size` (antialiased bilinear), then crop the centre: no padding, no distortion."""
    import torch
    import torch.nn.functional as F

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    n, src_h, src_w, _ = frames.shape
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"target size must be positive, got {size}")
    scale = max(h / src_h, w / src_w)
    new_h, new_w = max(h, round(src_h * scale)), max(w, round(src_w * scale))
    if (new_h, new_w) == (src_h, src_w):
        scaled = frames  # only a crop is needed
    else:
        # uint8 in channels-last layout takes torch's vectorised antialias kernel: ~40x faster than a float
        # round trip (12 ms vs 460 ms for 32 frames 1280x720 -> 48x85 on 2 cores), within 1 grey level of it.
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (N, 3, H, W) view, channels_last in memory
        y = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        scaled = y.permute(0, 2, 3, 1).numpy()  # (N, new_h, new_w, 3)
    top, left = (new_h - h) // 2, (new_w - w) // 2
    return np.ascontiguousarray(scaled[:, top:top + h, left:left + w])  # (N, h, w, 3)


def read_clips(path: str | Path, num_frames: int, target_fps: float | None, clips_per_video: int,
               buckets: Sequence[tuple[int, int]], backend: str = "auto",
               layout: str = "spread") -> tuple[VideoInfo, list[Clip]]:
    """Decode up to `clips_per_video` clips of `num_frames` frames at about target_fps, placed by `layout` (see
    clip_starts), resized into the best bucket.

    The distinct frames of all clips are decoded in increasing order, in calls of at most _DECODE_CHUNK_BYTES of
    raw frames, each resized at once: peak memory stays bounded for 4K sources, and PyAV decodes in one pass.
    Raises VideoError for any bad video; the returned info names the backend that finally decoded it, and its
    notes what could not be trusted (decoder fallbacks, frame counts) and which clips are variable-frame-rate.
    """
    with VideoReader(path, backend=backend) as reader:
        info = reader.info
        stride = frame_stride(info.fps, target_fps)
        span = clip_span(num_frames, stride)
        starts = clip_starts(info.num_frames, span, clips_per_video, layout, stride)
        bucket = choose_bucket(info.height, info.width, buckets)
        offsets = np.arange(num_frames) * stride  # (T,)
        wanted = sorted({int(s + o) for s in starts for o in offsets})
        per_call = max(1, _DECODE_CHUNK_BYTES // (info.height * info.width * 3))
        frames = np.empty((len(wanted), *bucket, 3), np.uint8)  # (U, h, w, 3)
        for a in range(0, len(wanted), per_call):
            raw = reader.get_frames(wanted[a:a + per_call])  # (n, H, W, 3)
            frames[a:a + len(raw)] = resize_center_crop(raw, bucket)  # (n, h, w, 3)
        notes = list(reader.notes)
        clips = []
        row = {f: i for i, f in enumerate(wanted)}
        for s in starts:
            fps, vfr = _clip_fps(reader, s, stride, num_frames)
            if vfr:
                notes.append(("vfr", vfr))
            clips.append(Clip(start=s, stride=stride, fps=fps, bucket=bucket,
                              frames=frames[[row[s + int(o)] for o in offsets]]))  # (T, h, w, 3)
        info = replace(reader.info, notes=tuple(notes))
    return info, clips


def _clip_fps(reader: VideoReader, start: int, stride: int, num_frames: int) -> tuple[float, Optional[str]]:
    """A clip's frame rate from its first and last timestamps, and a note when that is not the nominal rate."""
    nominal = reader.info.fps / stride
    first, last = reader.frame_seconds(start), reader.frame_seconds(start + (num_frames - 1) * stride)
    if num_frames < 2 or first is None or last is None or last <= first:
        return nominal, None
    measured = (num_frames - 1) / (last - first)
    if abs(measured / nominal - 1) <= VFR_TOLERANCE:
        return measured, None
    return measured, (f"clip at frame {start}: {measured:.2f} fps from its timestamps, {nominal:.2f} nominal "
                      f"({reader.info.fps:.2f} fps / stride {stride}): variable frame rate")


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, codec: str = "libx264", crf: int = 18,
              deterministic: bool = False) -> None:
    """Encode uint8 (N, H, W, 3) RGB frames as yuv420p mp4, atomically (temporary name, fsync, rename).

    yuv420p halves the chroma planes, so H and W must be even. The index goes to the front of the file
    (faststart) so players can stream it. x264's assembly gave different bytes for the same frames from one call
    to the next on an AVX-512 CPU (seen at 32x32, 64x36, 64x64, 144x176; it reads memory it did not write):
    `deterministic=True` turns it off, for files that must be identical everywhere (test and sample data), at
    4-7x the encoding time.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 (N>0, H, W, 3), got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size {h}x{w} (HxW) must be even in both sides for yuv420p")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be > 0, got {fps}")
    if deterministic and codec != "libx264":
        raise ValueError(f"deterministic encoding is only known for libx264, not {codec}")
    path = Path(path)

    def encode(tmp: Path) -> None:
        with av.open(str(tmp), "w", format="mp4" if not path.suffix else None,
                     options={"movflags": "+faststart"}) as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
            options = {"crf": str(crf)} if codec in _CRF_CODECS else {}
            if deterministic:
                options["x264-params"] = "no-asm=1"
            stream.options = options
            for frame in frames:  # (H, W, 3)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush delayed frames

    atomic_write_with(path, encode, keep_suffix=True)     # the suffix tells ffmpeg the container format


def join_mp4(parts: Sequence[str | Path], path: str | Path) -> int:
    """Concatenate mp4 files made by one encoder setting into `path` by copying their packets: no re-encoding (no
    second generation of loss), one packet in memory at a time; atomic. Returns the number of video packets.

    The parts must agree on codec, size, time base and codec headers (x264's SPS/PPS), or a decoder could misread
    the later ones: ValueError naming the first part that differs. Timestamps are shifted by the parts before.
    """
    import av

    if not parts:
        raise ValueError("join_mp4: no parts to join")
    count = 0

    def copy(tmp: Path) -> None:
        nonlocal count
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
            stream, first, offset = None, None, 0
            for part in parts:
                with av.open(str(part)) as src:
                    video = src.streams.video[0]
                    cc = video.codec_context
                    key = (cc.name, cc.width, cc.height, cc.pix_fmt, video.time_base, bytes(cc.extradata or b""))
                    if stream is None:
                        stream, first = out.add_stream_from_template(video), key
                    elif key != first:
                        raise ValueError(f"join_mp4: {part} was encoded differently from {parts[0]} "
                                         f"({key[:5]} vs {first[:5]}, same headers: {key[5] == first[5]})")
                    end = offset
                    for packet in src.demux(video):
                        if packet.dts is None:          # the demuxer's end-of-stream marker
                            continue
                        packet.pts += offset
                        packet.dts += offset
                        end = max(end, packet.pts + packet.duration)
                        packet.stream = stream
                        out.mux(packet)
                        count += 1
                    offset = end

    atomic_write_with(Path(path), copy, keep_suffix=True)
    return count

"""Real video files with the faults crawled datasets contain, for testing that a reader is not fooled by them.

    python -m data_prep.faulty_videos OUT_DIR      # writes the set below, one line per file

- `wrong_keyframes.mp4`: an AVI (named .mp4, as crawled files often are) whose index marks every 7th frame as a
  keyframe instead of the real ones. A reader that trusts the index seeks to frames that cannot be decoded alone
  and returns frames from the wrong positions.
- `x264_in_avi.mp4`: H.264 in an AVI without timestamps in its index, written by ffmpeg as is: decord2 3.4 returned
  frame 10 for frame 100 from such a file.
- `vfr.mp4`: a variable-frame-rate mp4 (25 fps for its first half, 12.5 fps for its second).
Every frame carries its own number (`frame_number_pattern`), so a test can tell which frame it got back.
"""
from __future__ import annotations

import struct
import sys
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

AVI_KEYFRAME_FLAG = 0x10        # AVIIF_KEYFRAME in an idx1 entry
_IDX1_ENTRY = struct.Struct("<4sIII")   # chunk id, flags, offset, size


def frame_number_pattern(n: int, height: int = 64, width: int = 64) -> np.ndarray:
    """uint8 (n, H, W, 3) frames that differ clearly from one another: a moving textured background and, on the
    top rows, the frame number as a brightness code (so no two frames look alike, even far apart)."""
    rng = np.random.default_rng(0)
    texture = np.kron(rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3)), np.ones((8, 8, 1)))
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i] = np.roll(texture, i, axis=1)[:height, :width]
        frames[i, :8] = (i * 37) % 256                       # the number, as a grey level on a band of rows
        frames[i, :8, : max(1, (i * width) // max(n, 1))] = 255   # and as the length of a white bar
    return frames


def write_avi(path: Path, frames: np.ndarray, fps: int, codec: str = "mpeg4", gop: int = 30) -> Path:
    """An AVI written by ffmpeg (through PyAV) with a keyframe every `gop` frames and no B-frames."""
    import av

    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        stream.gop_size = gop
        if codec == "libx264":
            stream.options = {"bf": "0", "sc_threshold": "0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return Path(path)


def rewrite_keyframe_flags(src: Path, dst: Path, is_key: Callable[[int], bool]) -> list[int]:
    """Copy an AVI, setting the idx1 keyframe flag of video frame i to is_key(i); returns the real keyframes."""
    data = bytearray(Path(src).read_bytes())
    at = data.find(b"idx1")
    if at < 0:
        raise ValueError(f"{src}: no idx1 index (not an AVI written with one)")
    (size,) = struct.unpack_from("<I", data, at + 4)
    real, frame = [], 0
    for entry in range(at + 8, at + 8 + size, _IDX1_ENTRY.size):
        chunk, flags, offset, length = _IDX1_ENTRY.unpack_from(data, entry)
        if chunk[2:4] not in (b"dc", b"db"):        # audio or other streams keep their flags
            continue
        if flags & AVI_KEYFRAME_FLAG:
            real.append(frame)
        flags = flags | AVI_KEYFRAME_FLAG if is_key(frame) else flags & ~AVI_KEYFRAME_FLAG
        _IDX1_ENTRY.pack_into(data, entry, chunk, flags, offset, length)
        frame += 1
    Path(dst).write_bytes(bytes(data))
    return real


def write_vfr_mp4(path: Path, frames: np.ndarray, durations_ms: Sequence[int]) -> Path:
    """An mp4 whose frame i lasts durations_ms[i] milliseconds (timestamps in a 1/1000 time base)."""
    import av

    if len(durations_ms) != len(frames):
        raise ValueError(f"{len(durations_ms)} durations for {len(frames)} frames")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(1000 * len(frames), int(sum(durations_ms))))
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for frame, duration in zip(frames, durations_ms):
            out = av.VideoFrame.from_ndarray(frame, format="rgb24")
            out.pts, out.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(out))
            pts += int(duration)
        container.mux(stream.encode())
    return Path(path)


def make_faulty_videos(folder: Path, num_frames: int = 120) -> dict[str, Path]:
    """The set described in the module docstring, in `folder`; returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frames = frame_number_pattern(num_frames)
    clean = write_avi(folder / ".clean_mpeg4.avi", frames, fps=24, codec="mpeg4", gop=30)
    rewrite_keyframe_flags(clean, folder / "wrong_keyframes.mp4", lambda i: i % 7 == 0)
    clean.unlink()
    write_avi(folder / "x264_in_avi.mp4", frames, fps=24, codec="libx264", gop=30)
    half = num_frames // 2
    write_vfr_mp4(folder / "vfr.mp4", frames, [40] * half + [80] * (num_frames - half))
    return {p.stem: p for p in sorted(folder.glob("*.mp4"))}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m data_prep.faulty_videos OUT_DIR", file=sys.stderr)
        return 2
    for name, path in make_faulty_videos(Path(args[0])).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

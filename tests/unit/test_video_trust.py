"""The reader never returns a frame it cannot show is the one asked for: decord's known lies on real files.

Each faulty file is real (written by ffmpeg through PyAV, then damaged the way crawled files are) and every frame
carries its own number, so `frame_ids` can say which frame came back. The shape bug of decord2 on AVX-512 CPUs is
tested for real where this CPU has it and through a shim that reproduces its output everywhere else.
"""
from __future__ import annotations

import numpy as np
import pytest

import hpcvid.data.decoders as decoders
from data_prep.faulty_videos import frame_number_pattern, make_faulty_videos
from hpcvid.data.decoders import ContainerIndex, PyAVSource
from hpcvid.data.video import VideoError, VideoReader, read_clips, write_mp4

NUM_FRAMES = 120
WANTED = [40, 41, 42, 60, 100, 119]      # two runs and single frames, spread over several groups of pictures


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    return make_faulty_videos(tmp_path_factory.mktemp("faulty"), NUM_FRAMES)


@pytest.fixture(scope="module")
def reference():
    return frame_number_pattern(NUM_FRAMES)


def frame_ids(frames: np.ndarray, reference: np.ndarray) -> list[int]:
    """For each decoded frame, the number of the reference frame it is closest to."""
    diffs = np.abs(frames[:, None].astype(np.int16) - reference[None].astype(np.int16))   # (N, R, H, W, 3)
    return diffs.reshape(len(frames), len(reference), -1).mean(axis=2).argmin(axis=1).tolist()


def raw_decord_ids(path, reference) -> list[int] | str:
    """What decord itself returns for WANTED, unchecked (or its error)."""
    vr = decoders._import_decord().VideoReader(str(path))
    try:
        return frame_ids(vr.get_batch(WANTED).asnumpy(), reference)
    except Exception as exc:   # noqa: BLE001 - recorded, compared below
        return f"error: {exc}"


# ---------------------------------------------------------------- files whose index lies

@pytest.mark.parametrize("name", ["wrong_keyframes", "x264_in_avi"])
def test_lying_index_gives_the_right_frames_or_fails(faulty, reference, name):
    raw = raw_decord_ids(faulty[name], reference)
    # the file must really fool decord, or this test proves nothing (decord2 is pinned in the lock)
    assert raw != WANTED, f"{name}: decord now reads this file correctly; make a fault that still fools it"
    with VideoReader(faulty[name]) as r:
        got = r.get_frames(WANTED)
        assert frame_ids(got, reference) == WANTED
        assert r.info.backend == "pyav"
        assert [code for code, _ in r.notes] == ["decoder_fallback"] and name in r.notes[0][1]
    with VideoReader(faulty[name], backend="decord") as r, pytest.raises(VideoError) as err:
        r.get_frames(WANTED)
    assert err.value.reason == "untrusted_frames" and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["wrong_keyframes", "x264_in_avi"])
def test_read_clips_of_a_lying_index_are_the_in_order_frames(faulty, reference, name):
    info, clips = read_clips(faulty[name], num_frames=8, target_fps=12, clips_per_video=3, buckets=[(64, 64)])
    assert [code for code, _ in info.notes] == ["decoder_fallback"]
    for clip in clips:
        expect = list(range(clip.start, clip.start + 8 * clip.stride, clip.stride))
        assert frame_ids(clip.frames, reference) == expect


def test_in_order_decoding_places_frames_by_timestamp(faulty, reference):
    source = PyAVSource(ContainerIndex.read(str(faulty["wrong_keyframes"])), num_threads=1)
    try:
        assert frame_ids(source.get(WANTED), reference) == WANTED
        assert frame_ids(source.get([3, 119]), reference) == [3, 119]      # going back restarts
    finally:
        source.close()


def test_a_seek_onto_a_false_keyframe_is_refused(faulty):
    source = PyAVSource(ContainerIndex.read(str(faulty["wrong_keyframes"])), num_threads=1)
    with pytest.raises(decoders.Untrusted, match="not"):
        source.decode_at(49)          # flagged as a keyframe (49 % 7 == 0), but a predicted picture


def test_no_timestamps_means_counted_positions_checked_against_the_total(tmp_path, reference):
    import av

    path = tmp_path / "raw.h264"                      # an elementary stream: no container, no timestamps
    with av.open(str(path), "w", format="h264") as c:
        s = c.add_stream("libx264", rate=24)
        s.height, s.width, s.pix_fmt = 64, 64, "yuv420p"
        for frame in reference:
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(s.encode())
    with VideoReader(path) as r:
        assert r.index.pts is None
        assert frame_ids(r.get_frames([5, 60, 119]), reference) == [5, 60, 119]
        assert r.info.backend == "pyav"


# ---------------------------------------------------------------- decord's shape bug on AVX-512 CPUs

def test_small_width_is_read_right_whatever_the_cpu(tmp_path):
    """32 px wide: decord2 gives (32, 32, 6) frames on AVX-512 CPUs and right ones elsewhere."""
    frames = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    frames = np.kron(frames[:, ::8, ::8], np.ones((1, 8, 8, 1), np.uint8))     # blocky: survives the codec
    path = tmp_path / "small.mp4"
    write_mp4(path, frames, 12)
    truth = PyAVSource(ContainerIndex.read(str(path)), 1).get(list(range(12)))
    buggy = decoders._import_decord().VideoReader(str(path)).next().shape[2] != 3
    with VideoReader(path) as r:
        assert np.array_equal(r.get_frames(range(12)), truth)
        assert r.info.backend == ("pyav" if buggy else "decord")
        assert ("decoder_fallback" in dict(r.notes)) == buggy
    if buggy:
        with pytest.raises(VideoError) as err:
            VideoReader(path, backend="decord")
        assert err.value.reason == "untrusted_frames"


class _ShapeBugDecord:
    """decord as it behaves on AVX-512 CPUs for small widths: rows padded to 64 pixels, read as extra channels."""

    def __init__(self, real):
        self.real, self.logging, self.cpu = real, real.logging, real.cpu

    def VideoReader(self, *args, **kwargs):
        vr = self.real.VideoReader(*args, **kwargs)
        first = vr.next().asnumpy()                               # (H, W, 3)
        h, w, _ = first.shape
        padded = np.zeros((h, 2 * w, 3), np.uint8)
        padded[:, :w] = first
        bad = padded.reshape(h, w, 6)                             # what the bug hands back

        class Reader:
            def next(self):
                return type("A", (), {"asnumpy": lambda _s: bad})()

            def __getattr__(self, name):
                return getattr(vr, name)

            def __len__(self):
                return len(vr)

        return Reader()


def test_shape_bug_is_caught_on_any_cpu(tmp_path, monkeypatch):
    frames = np.full((6, 64, 64, 3), 100, np.uint8)
    path = tmp_path / "v.mp4"
    write_mp4(path, frames, 6)
    real = decoders._import_decord()
    monkeypatch.setattr(decoders, "_import_decord", lambda: _ShapeBugDecord(real))
    with VideoReader(path) as r:
        assert r.get_frames([0, 5]).shape == (2, 64, 64, 3) and r.info.backend == "pyav"
        assert "(64, 64, 6)" in dict(r.notes)["decoder_fallback"]
    with pytest.raises(VideoError) as err:
        VideoReader(path, backend="decord")
    assert err.value.reason == "untrusted_frames"


# ---------------------------------------------------------------- frame counts and frame rates

def test_disagreeing_frame_counts_never_repeat_the_last_frame(tmp_path, reference, monkeypatch):
    """decord counting one frame more than the container (seen: 456 vs 455) must not hand out a repeat."""
    path = tmp_path / "v.mp4"
    write_mp4(path, reference, 24)
    real_init = decoders.DecordSource.__init__

    def one_more(self, index, num_threads):
        real_init(self, index, num_threads)
        self.num_frames += 1
        real_get = self.get
        # decord's answer for its phantom last frame: the frame before it again
        self.get = lambda idx: real_get([min(i, index.num_frames - 1) for i in idx])

    monkeypatch.setattr(decoders.DecordSource, "__init__", one_more)
    with VideoReader(path) as r:
        assert r.info.num_frames == NUM_FRAMES
        assert "frame_count_mismatch" in dict(r.notes)
        assert frame_ids(r.get_frames([NUM_FRAMES - 2, NUM_FRAMES - 1]), reference) == [NUM_FRAMES - 2,
                                                                                       NUM_FRAMES - 1]
        with pytest.raises(IndexError):
            r.get_frames([NUM_FRAMES])


def test_variable_frame_rate_clips_are_noted(faulty):
    info, clips = read_clips(faulty["vfr"], num_frames=8, target_fps=None, clips_per_video=3, buckets=[(64, 64)])
    vfr = [detail for code, detail in info.notes if code == "vfr"]
    assert [c.start for c in clips] == [0, 56, 112]
    assert clips[0].fps == pytest.approx(25.0) and clips[2].fps == pytest.approx(12.5)
    assert len(vfr) == 3 and "variable frame rate" in vfr[0]


def test_constant_frame_rate_has_no_notes(tmp_path, reference):
    path = tmp_path / "cfr.mp4"
    write_mp4(path, reference, 30000 / 1001)
    info, clips = read_clips(path, num_frames=8, target_fps=10, clips_per_video=3, buckets=[(64, 64)])
    assert info.notes == () and info.backend == "decord"
    assert all(c.fps == pytest.approx(30000 / 1001 / 3, rel=1e-3) for c in clips)

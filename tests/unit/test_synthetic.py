"""Tests for data_prep.make_synthetic: determinism, requested sizes/rates/lengths, real motion, captions, CLI."""
import dataclasses

import numpy as np
import pytest

from data_prep.make_synthetic import (
    DEFAULT_SPECS, SHAPE_COLOURS, _bounce, main, make_caption, make_scene, make_synthetic_videos, render_frames,
)
from hpcvid.data.video import VideoReader

SPECS = [
    {"name": "sq", "height": 32, "width": 32, "fps": 8, "num_frames": 12},
    {"name": "land", "height": 36, "width": 64, "fps": 30, "num_frames": 20},
    {"name": "port", "height": 64, "width": 36, "fps": 24, "num_frames": 6},
]


def decode_all(path):
    with VideoReader(path) as r:
        return r.info, r.get_frames(range(r.info.num_frames))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make_synthetic_videos(tmp_path_factory.mktemp("syn"), SPECS, seed=3)


def test_sizes_rates_and_lengths_as_requested(made):
    assert [p.name for p, _ in made] == ["sq.mp4", "land.mp4", "port.mp4"]
    for (path, caption), spec in zip(made, SPECS):
        info, frames = decode_all(path)
        assert (info.num_frames, info.height, info.width) == (spec["num_frames"], spec["height"], spec["width"])
        assert info.fps == pytest.approx(spec["fps"])
        assert frames.shape == (spec["num_frames"], spec["height"], spec["width"], 3)
        assert caption == make_caption(spec["name"], seed=3)


def test_deterministic_by_seed(made, tmp_path):
    again = make_synthetic_videos(tmp_path / "a", SPECS[::-1], seed=3)  # order must not matter
    other = make_synthetic_videos(tmp_path / "b", SPECS, seed=4)
    by_name = {p.name: (p, c) for p, c in again}
    for (path, caption), (path_other, caption_other) in zip(made, other):
        same_path, same_caption = by_name[path.name]
        assert caption == same_caption
        assert path.read_bytes() == same_path.read_bytes()       # encoded identically, whatever the CPU
        assert np.array_equal(decode_all(path)[1], decode_all(same_path)[1])   # and read identically
        assert not np.array_equal(decode_all(path)[1], decode_all(path_other)[1])


def test_scene_and_caption_depend_only_on_name_and_seed():
    assert make_scene("clip_a", 0) == make_scene("clip_a", 0)
    assert make_scene("clip_a", 0) != make_scene("clip_b", 0)
    assert make_caption("clip_a", 7) == make_caption("clip_a", 7)
    captions = {make_caption(f"v{i}", 0) for i in range(20)}
    assert len(captions) > 15  # varied, so text conditioning has something to learn


def test_caption_describes_every_shape():
    for name in ("a", "b", "c", "d"):
        scene, caption = make_scene(name), make_caption(name)
        assert 2 <= len(scene.shapes) <= 4
        for s in scene.shapes:
            assert f"{s.colour} {s.kind} moving" in caption and s.colour in SHAPE_COLOURS
        assert " a o" not in caption  # "an orange"


def test_shapes_move():
    scene = dataclasses.replace(make_scene("mover", 0), drift=0.0)  # frozen background: only shapes change
    frames = render_frames(scene, 48, 64, 24.0, 12).astype(int)  # (T, H, W, 3)
    diffs = np.abs(np.diff(frames, axis=0)).sum(axis=(1, 2, 3))  # (T-1,)
    assert (diffs > 0).all()
    still = render_frames(dataclasses.replace(scene, shapes=()), 48, 64, 24.0, 12)
    assert (still == still[0]).all()  # and without shapes nothing moves


def test_written_videos_change_over_time(made):
    for path, _ in made:
        frames = decode_all(path)[1].astype(int)
        assert (np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3)) > 0.1).all()


def test_bounce_stays_inside_walls():
    travel = np.linspace(-500, 500, 2001)
    pos = _bounce(np.float32(5.0), travel, 2.0, 10.0)
    assert pos.min() >= 2.0 and pos.max() <= 10.0
    # 5+3 = 8 inside; 5+7 = 12 reflects off 10 to 8; 5-5 = 0 reflects off 2 to 4
    assert _bounce(np.float32(5.0), np.array([3.0, 7.0, -5.0]), 2.0, 10.0).tolist() == [8.0, 8.0, 4.0]


def test_default_specs_are_varied():
    ratios = {s["height"] / s["width"] for s in DEFAULT_SPECS}
    assert any(r == 1 for r in ratios) and any(r < 1 for r in ratios) and any(r > 1 for r in ratios)
    assert {8.0, 24.0, 30.0} <= {float(s["fps"]) for s in DEFAULT_SPECS}
    assert any(s["num_frames"] < 16 for s in DEFAULT_SPECS)


def test_bad_specs_rejected(tmp_path):
    with pytest.raises(ValueError, match="odd|even"):
        make_synthetic_videos(tmp_path, [{"name": "x", "height": 31, "width": 32, "fps": 8, "num_frames": 4}])
    with pytest.raises(ValueError, match="fps"):
        make_synthetic_videos(tmp_path, [{"name": "x", "height": 32, "width": 32, "num_frames": 4}])
    with pytest.raises(ValueError, match="unique"):
        make_synthetic_videos(tmp_path, [SPECS[0], SPECS[0]])


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(out), "--count", "2", "--size", "32x48", "--frames", "5", "--fps", "10", "--captions"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["synth_000.mp4", "synth_000.txt", "synth_001.mp4",
                                                     "synth_001.txt"]
    info, _ = decode_all(out / "synth_001.mp4")
    assert (info.num_frames, info.height, info.width, info.fps) == (5, 32, 48, 10.0)
    assert (out / "synth_000.txt").read_text().strip() == make_caption("synth_000")
    assert "synth_000.mp4" in capsys.readouterr().out
    assert main([str(out), "--size", "31x48"]) == 2

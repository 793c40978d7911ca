"""Manifests: the real WebVid / OpenVid CSV layouts and folders, filters, and the shard partition."""
import csv
from pathlib import Path

import pytest

from hpcvid.config import ManifestSpec
from hpcvid.data import manifest as mf

WEBVID_HEADER = ["videoid", "contentUrl", "duration", "page_dir", "name"]
OPENVID_HEADER = ["video", "caption", "aesthetic score", "motion score", "temporal consistency score",
                  "camera motion", "frame", "fps", "seconds"]


def write_csv(path: Path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def spec(**kw):
    return ManifestSpec(**kw)


def test_webvid_paths_duration_and_filters(tmp_path):
    (tmp_path / "videos" / "pg1").mkdir(parents=True)
    (tmp_path / "videos" / "11.mp4").write_bytes(b"x")
    (tmp_path / "videos" / "pg1" / "12.mp4").write_bytes(b"x")
    csv_path = write_csv(tmp_path / "webvid.csv", WEBVID_HEADER, [
        ["11", "http://u/11", "PT00H00M11S", "pg0", "a dog runs"],
        ["12", "http://u/12", "PT00H01M02S", "pg1", "a cat sleeps"],
        ["13", "http://u/13", "PT00H00M03S", "pg1", "rain on a window"],
        ["14", "http://u/14", "PT00H00M20S", "pg1", ""],
    ])
    s = spec(kind="webvid", path=str(csv_path), video_root=str(tmp_path / "videos"), min_duration=5, max_duration=60)
    rows = list(mf.iter_manifest(s))
    assert [r.index for r in rows] == [0, 1, 2, 3] and mf.count_rows(s) == 4
    assert rows[0].duration == 11 and rows[1].duration == 62
    verdicts = [mf.check_row(r, s) for r in rows]
    assert verdicts[0][0] == tmp_path / "videos" / "11.mp4" and verdicts[0][1] is None
    assert verdicts[1][1].reason == "duration_too_long" and verdicts[1][1].status == "filtered"
    assert verdicts[2][1].reason == "duration_too_short"
    assert verdicts[3][1].reason == "empty_caption" and verdicts[3][1].status == "failed"
    s2 = spec(kind="webvid", path=str(csv_path), video_root=str(tmp_path / "videos"))
    assert mf.check_row(rows[1], s2)[0] == tmp_path / "videos" / "pg1" / "12.mp4"   # <root>/<page_dir>/<id>.mp4
    missing = mf.check_row(rows[2], s2)[1]
    assert missing.reason == "missing_file" and missing.status == "failed" and "13.mp4" in missing.detail
    skip = spec(kind="webvid", path=str(csv_path), video_root=str(tmp_path / "videos"), skip_missing=True)
    assert mf.check_row(rows[2], skip)[1].status == "filtered"


def test_openvid_scores_and_camera(tmp_path):
    for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4"):
        (tmp_path / name).write_bytes(b"x")
    csv_path = write_csv(tmp_path / "openvid.csv", OPENVID_HEADER, [
        ["a.mp4", "cap a", "5.5", "3.0", "0.99", "static", "120", "24", "5.0"],
        ["b.mp4", "cap b", "4.0", "3.0", "0.99", "static", "120", "24", "5.0"],
        ["c.mp4", "cap c", "5.5", "9.0", "0.99", "pan_left", "120", "24", "5.0"],
        ["d.mp4", "cap d", "n/a", "3.0", "0.99", "static", "120", "24", "5.0"],
    ])
    s = spec(kind="openvid", path=str(csv_path), min_aesthetic_score=5.0, max_motion_score=8.0,
             camera_motion=["static", "pan_left"])
    rows = list(mf.iter_manifest(s))
    assert rows[0].video_id == "a" and rows[0].duration == 5.0
    problems = [mf.check_row(r, s)[1] for r in rows]
    assert problems[0] is None
    assert problems[1].reason == "low_aesthetic_score" and problems[1].status == "filtered"
    assert problems[2].reason == "high_motion_score"
    assert problems[3].reason == "bad_row" and "'aesthetic score' is 'n/a'" in problems[3].detail
    only_pan = spec(kind="openvid", path=str(csv_path), camera_motion=["pan_left"])
    assert mf.check_row(rows[0], only_pan)[1].reason == "camera_motion"


def test_missing_column_is_a_user_error(tmp_path):
    csv_path = write_csv(tmp_path / "bad.csv", ["videoid", "duration"], [["1", "PT1S"]])
    with pytest.raises(mf.ManifestError, match=r"bad.csv: header: missing column 'name'"):
        list(mf.iter_manifest(spec(kind="webvid", path=str(csv_path))))
    with pytest.raises(mf.ManifestError, match="cannot open"):
        mf.count_rows(spec(kind="openvid", path=str(tmp_path / "none.csv")))


def test_folder_captions_and_order(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.mp4", "a.webm", "sub/c.mp4", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "b.txt").write_text("  caption of b \n")
    s = spec(kind="folder", path=str(tmp_path))
    rows = list(mf.iter_manifest(s))
    assert [r.video_id for r in rows] == ["a", "b", "sub/c"]
    assert rows[1].caption == "caption of b" and rows[0].caption == ""
    assert mf.check_row(rows[0], s)[1].reason == "empty_caption"
    assert mf.check_row(rows[0], spec(kind="folder", path=str(tmp_path), require_caption=False))[1] is None
    assert mf.count_rows(spec(kind="folder", path=str(tmp_path), limit=2)) == 2
    with pytest.raises(mf.ManifestError, match="not a folder"):
        mf.count_rows(spec(kind="folder", path=str(tmp_path / "nope")))


@pytest.mark.parametrize("total, per_shard, workers", [(0, 4, 1), (10, 4, 1), (10, 4, 3), (37, 5, 4), (8, 8, 16)])
def test_partition_covers_every_row_once(total, per_shard, workers):
    n = mf.num_shards(total, per_shard)
    seen = []
    for w in range(workers):
        for shard in mf.shards_for_worker(n, w, workers):
            rows = mf.shard_rows(shard, total, per_shard)
            assert all(mf.shard_of(i, per_shard) == shard for i in rows)
            seen += list(rows)
    assert sorted(seen) == list(range(total))


def test_keep_selects_rows(tmp_path):
    csv_path = write_csv(tmp_path / "o.csv", OPENVID_HEADER, [[f"{i}.mp4", f"c{i}"] + [""] * 7 for i in range(10)])
    s = spec(kind="openvid", path=str(csv_path), limit=8)
    assert [r.index for r in mf.iter_manifest(s, keep=lambda i: i % 3 == 0)] == [0, 3, 6]

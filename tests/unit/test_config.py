"""Strict job-spec loading: every mistake is one line naming the file and the key path."""
import subprocess
import sys
from pathlib import Path

import pytest

from hpcvid.config import SpecError, load_job

BASE = """\
prep:
  manifest: {kind: folder, path: videos}
  output: out
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_fill_in(tmp_path):
    job = load_job(write(tmp_path, BASE))
    assert job.prep.clip.num_frames == 16
    assert job.prep.buckets == [(256, 256)]
    assert job.prep.text.encoder == "minilm"


@pytest.mark.parametrize("extra, overrides, key, words", [
    ("  clip: {num_frames: sixteen}\n", [], "prep.clip.num_frames", "expected int, got 'sixteen'"),
    ("  clip: {num_frame: 8}\n", [], "prep.clip.num_frame", "unknown key"),
    ("", ["prep.manifest.kind=webm"], "prep.manifest.kind", "expected one of 'folder', 'webvid', 'openvid'"),
    ("", ["prep.clip.num_frames=0"], "prep.clip.num_frames", "must be > 0"),
    ("", ["prep.clip.fps=fast"], "prep.clip.fps", "expected a number"),
    ("", ["prep.buckets=[[64, 64, 3]]"], "prep.buckets[0]", "expected a list of 2 values"),
    ("", ["prep.buckets=[[64, 63]]", "prep.encoder.downsample=2"], "prep.buckets[0]", "divisible"),
    ("", ["prep.progress=3"], "prep.progress", "expected true or false"),
    ("", ["prep.manifest.min_motion_score=2"], "prep.manifest.min_motion_score", "only applies to kind 'openvid'"),
    ("", ["prep.manifest.min_duration=5", "prep.manifest.max_duration=2"], "prep.manifest.min_duration", "above"),
])
def test_errors_name_file_and_key(tmp_path, extra, overrides, key, words):
    path = write(tmp_path, BASE + extra)
    with pytest.raises(SpecError) as info:
        load_job(path, overrides)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message
    assert "\n" not in message


def test_missing_required(tmp_path):
    with pytest.raises(SpecError, match=r"prep.output: missing required value"):
        load_job(write(tmp_path, "prep:\n  manifest: {kind: folder, path: v}\n"))


def test_override_types_and_new_sections(tmp_path):
    job = load_job(write(tmp_path, BASE), ["prep.clip.num_frames=8", "prep.buckets=[[32, 48]]",
                                           "prep.manifest.limit=null", "prep.text.encoder=none"])
    assert job.prep.clip.num_frames == 8 and job.prep.buckets == [(32, 48)]
    assert job.prep.text.encoder == "none" and job.prep.manifest.limit is None
    with pytest.raises(SpecError, match="KEY.PATH=VALUE"):
        load_job(write(tmp_path, BASE), ["prep.clip.num_frames"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job(write(tmp_path, "prep: [unclosed\n"))
    with pytest.raises(SpecError, match="cannot read"):
        load_job(tmp_path / "nope.yaml")


def test_cli_check_exit_codes(tmp_path):
    good = write(tmp_path, BASE)
    ok = subprocess.run([sys.executable, "-m", "hpcvid.cli", "check", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "hpcvid.cli", "check", str(good), "--set", "prep.clip.num_frames=x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "prep.clip.num_frames: expected int, got 'x'" in lines[0]
    assert "Traceback" not in bad.stderr


def test_shipped_jobs_validate():
    for path in sorted(Path(__file__).resolve().parents[2].joinpath("jobs").glob("*.yaml")):
        if not path.name.startswith("pipeline_"):
            load_job(path)

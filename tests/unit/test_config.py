"""Strict job-spec loading: every mistake is one line naming the file and the key path."""
import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from hpcvid.config import (STAGE_SECTIONS, JobSpec, SpecError, UserError, load_job, name_source, parse_spec,
                           preflight, read_yaml)

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
    (tmp_path / "videos").mkdir()                    # BASE's relative paths, from the folder the command runs in
    ok = subprocess.run([sys.executable, "-m", "hpcvid.cli", "check", str(good)], capture_output=True, text=True,
                        cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "hpcvid.cli", "check", str(good), "--set", "prep.clip.num_frames=x"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "prep.clip.num_frames: expected int, got 'x'" in lines[0]
    assert "Traceback" not in bad.stderr


JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_shipped_jobs_validate():
    for path in sorted(JOBS.glob("*.yaml")):
        if not path.name.startswith("pipeline_"):
            load_job(path)


def test_shipped_quickstart_jobs_pass_preflight_where_their_data_is(tmp_path, monkeypatch):
    """The jobs with relative paths pass every check from a folder laid out as `make quickstart` leaves it (the
    others name cluster paths, /datasets and /scratch, that this machine has not)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/quickstart/videos").mkdir(parents=True)
    (tmp_path / "runs/tiny_reducio").mkdir(parents=True)       # quickstart_reducio_prep's encoder, trained first
    for name in ("quickstart_prep", "quickstart_reducio_prep", "selftest", "tiny_reducio", "tiny_cmd"):
        preflight(load_job(JOBS / f"{name}.yaml"), name)
    with pytest.raises(SpecError, match="tiny_cmd: eval_ae.checkpoint: no such checkpoint"):
        preflight(load_job(JOBS / "tiny_cmd.yaml"), "tiny_cmd", "eval_ae")    # strict for the stage that runs


# ---------------------------------------------------------------------------------------------------- reading YAML

def test_not_utf8_names_line_and_offset(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(BASE.encode() + b"  output: caf\xe9\n")
    with pytest.raises(SpecError) as info:
        load_job(path)
    assert str(info.value) == (f"{path}: line 4: not UTF-8 text (byte 0xe9 at byte offset {len(BASE) + 13}); "
                               f"save the job file as UTF-8")


@pytest.mark.parametrize("text, key, lines", [
    ("a: 1\nb: 2\na: 3\n", "a", (3, 1)),
    ("a:\n  b: {c: 1, c: 2}\n", "a.b.c", (2, 2)),
    ("a:\n  - x: 1\n  - x: 1\n    y: 2\n    x: 3\n", "a[1].x", (5, 3)),
    ("a: {1: x, 0x1: y}\n", "a.1", (1, 1)),                 # one key to YAML and to a dict
])
def test_duplicate_keys_at_any_depth(tmp_path, text, key, lines):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        read_yaml(path)
    assert str(info.value) == (f"{path}: {key}: duplicate key at line {lines[0]} (first given at line {lines[1]}); "
                               f"keep one of them")


def test_merge_keys_may_be_overridden_and_set_values_are_strict(tmp_path):
    path = write(tmp_path, "base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  x: 3\n")
    assert read_yaml(path)["use"] == {"x": 3, "y": 2}
    with pytest.raises(SpecError, match=r"job.yaml: prep.clip.fps: duplicate key"):
        load_job(write(tmp_path, BASE), ["prep.clip={fps: 1, fps: 2}"])


@pytest.mark.parametrize("text", ["", "\n\n", "# only\n# comments\n"])
def test_empty_file_is_refused(tmp_path, text):
    with pytest.raises(SpecError, match=r"job.yaml: no stage section \(the file is empty or only comments\); "
                                         r"add one of prep:, selftest:, train_ae:, eval_ae:, train:, sample:, render:$"):
        load_job(write(tmp_path, text))


# ---------------------------------------------------------------------------------------------------- numbers

TRAIN = """\
train_ae:
  model: {kind: reducio}
  data: {manifest: {kind: folder, path: v}}
  output: run
"""


@pytest.mark.parametrize("base, override, key", [
    (BASE, "prep.clip.fps=.nan", "prep.clip.fps"),
    (BASE, "prep.clip.fps=-.inf", "prep.clip.fps"),
    (BASE, "prep.manifest.min_duration=.inf", "prep.manifest.min_duration"),
    (TRAIN, "train_ae.lr=.nan", "train_ae.lr"),
    (TRAIN, "train_ae.betas=[.nan, 0.9]", "train_ae.betas[0]"),
    (TRAIN, "train_ae.loss.kl=.inf", "train_ae.loss.kl"),
    (TRAIN, "train_ae.model.overrides={widths: [1, .nan]}", "train_ae.model.overrides.widths[1]"),
    (TRAIN, "train_ae.grad_clip=" + "9" * 400, "train_ae.grad_clip"),      # an int that is inf as a float
])
def test_non_finite_numbers_are_refused_everywhere(tmp_path, base, override, key):
    with pytest.raises(SpecError) as info:
        load_job(write(tmp_path, base), [override])
    assert info.value.key == key and "must be a finite number" in info.value.message


@pytest.mark.parametrize("base, override, key, words", [
    (BASE, "prep.clip.num_frames=9999999999", "prep.clip.num_frames", "must be <= 4096 (got 9999999999)"),
    (BASE, "prep.clip.fps=0", "prep.clip.fps", "must be > 0 (got 0.0)"),
    (BASE, "prep.buckets=[[64, 64], [64, 100000]]", "prep.buckets[1]",
     "each value must be positive and <= 8192 (got a list [64, 100000])"),
    (BASE, "prep.shards.rows_per_shard=10000000", "prep.shards.rows_per_shard", "must be <= 1000000"),
    (BASE, "prep.decode_workers=100000", "prep.decode_workers", "must be <= 1024"),
    (BASE, "prep.text.max_tokens=100000", "prep.text.max_tokens", "must be <= 8192"),
    (BASE, "prep.encoder.downsample=512", "prep.encoder.downsample", "must be <= 256"),
    (TRAIN, "train_ae.lr=1.0e+7", "train_ae.lr", "must be <= 1000000"),
    (TRAIN, "train_ae.betas=[0.9, 1.0]", "train_ae.betas", "each value must be in [0, 1)"),
    (TRAIN, "train_ae.data.resolution=[0, 64]", "train_ae.data.resolution", "each value must be positive"),
    (TRAIN, "train_ae.seed=18446744073709551616", "train_ae.seed", "must be <= 9223372036854775807"),
    (TRAIN, "train_ae.warmup_steps=-1", "train_ae.warmup_steps", "must be >= 0"),
])
def test_bounds(tmp_path, base, override, key, words):
    with pytest.raises(SpecError) as info:
        load_job(write(tmp_path, base), [override])
    assert info.value.key == key and words in info.value.message, info.value


def test_exponents_yaml_reads_as_strings_get_a_hint(tmp_path):
    with pytest.raises(SpecError, match=r"train_ae.lr: expected a number, got '1e-4' \(a string to YAML: write"):
        load_job(write(tmp_path, TRAIN), ["train_ae.lr=1e-4"])


def test_large_learning_rates_stay_allowed(tmp_path):
    """Divergence handling (train_ae.max_nonfinite_steps) is tested with a learning rate of 1000."""
    assert load_job(write(tmp_path, TRAIN), ["train_ae.lr=1000", "train_ae.loss.disc_lr=1000"]).train_ae.lr == 1000


def _number_fields(cls, at=""):
    """(key, field) of every int/float field (alone, optional, or in a list/tuple) reachable from `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{at}.{f.name}" if at else f.name
        leaves, seen = [tp], []
        while leaves:
            t = leaves.pop()
            args = [a for a in typing.get_args(t) if a is not type(None)]
            if dataclasses.is_dataclass(t):
                yield from _number_fields(t, key)
            elif typing.get_origin(t) in (list, tuple, typing.Union) or isinstance(t, type(int | None)):
                leaves += args
            elif t in (int, float):
                seen.append(t)
        if seen:
            yield key, f


def test_every_number_field_has_bounds():
    fields = list(_number_fields(JobSpec))
    assert len(fields) > 40
    unbounded = [key for key, f in fields if "bound" not in f.metadata]
    assert unbounded == []


# ---------------------------------------------------------------------------------------------------- sections

@pytest.mark.parametrize("text, key, words", [
    (BASE + "  clip: null\n", "prep.clip", "expected a mapping (the clip: section), got null"),
    (BASE + "  clip:\n", "prep.clip", "expected a mapping (the clip: section), got null"),
    (BASE + "  clip: 5\n", "prep.clip", "expected a mapping (the clip: section), got 5"),
    ("prep:\n", "prep", "expected a mapping (the prep: section), got null; fill it in or remove the key"),
    ("prep:\nselftest: {output: o}\n", "prep", "expected a mapping (the prep: section), got null"),
    (BASE + "  buckets:\n", "prep.buckets", "expected a list, got null"),
    ("prep:\n  manifest:\n  output: out\n", "prep.manifest", "expected a mapping (the manifest: section), got null"),
    (BASE + "  decode_backend:\n", "prep.decode_backend", "expected one of 'auto', 'decord', 'pyav', got null"),
])
def test_null_sections_say_what_they_need(tmp_path, text, key, words):
    with pytest.raises(SpecError) as info:
        load_job(write(tmp_path, text))
    assert info.value.key == key and words in info.value.message
    assert "class" not in str(info.value) and "typing" not in str(info.value)


def test_optional_subsection_null_means_none(tmp_path):
    """data.manifest: null drops a manifest section (e.g. one merged in, with source: shards)."""
    job = load_job(write(tmp_path, TRAIN), ["train_ae.data.manifest=null", "train_ae.data.source=shards",
                                            "train_ae.data.shards=s"])
    assert job.train_ae.data.manifest is None


# ---------------------------------------------------------------------------------------------------- preflight

def spec_in(tmp_path: Path, text: str = BASE, overrides=()) -> JobSpec:
    return load_job(write(tmp_path, text), list(overrides))


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A working folder with the inputs BASE names (videos/) and a regular file to trip over."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "videos").mkdir()
    (tmp_path / "a_file").write_text("x")
    return tmp_path


@pytest.mark.parametrize("overrides, key, words", [
    (["prep.manifest.path=gone"], "prep.manifest.path", "no such folder of videos (got 'gone', relative to "),
    (["prep.manifest.path=a_file"], "prep.manifest.path", "is a file, not a folder"),
    (["prep.manifest.kind=webvid"], "prep.manifest.path", "is not a file (got 'videos'"),
    (["prep.manifest.kind=webvid", "prep.manifest.path=a_file", "prep.manifest.video_root=vids"],
     "prep.manifest.video_root", "no such folder of videos"),
    (["prep.encoder.kind=cmd", "prep.encoder.checkpoint=run"], "prep.encoder.checkpoint",
     "no such checkpoint or training output folder"),
    (["prep.text.encoder=videos"], "prep.text.encoder", "nor a local Hugging Face model folder with a config.json"),
    (["prep.output=a_file"], "prep.output", "is an existing file, not a folder"),
    (["prep.output=a_file/sub/out"], "prep.output", "cannot be created: "),
    (["prep.output="], "prep.output", "must not be empty"),
])
def test_preflight_names_the_key(here, overrides, key, words):
    job = spec_in(here, BASE, overrides)
    with pytest.raises(SpecError) as info:
        preflight(job, "job.yaml")
    assert str(info.value).startswith(f"job.yaml: {key}: ") and words in info.value.message, info.value
    before = sorted(p.name for p in here.iterdir())
    assert sorted(p.name for p in here.iterdir()) == before          # checking created nothing


def test_preflight_accepts_creatable_outputs_and_creates_nothing(here):
    (here / "model").mkdir()
    (here / "model" / "config.json").write_text("{}")
    for output in ("out", "deep/er/out", str(here / "videos"), "videos/new"):
        preflight(spec_in(here, BASE, [f"prep.output={output}", "prep.text.encoder=model"]), "job.yaml")
    assert not (here / "out").exists() and not (here / "deep").exists() and not (here / "videos" / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the file-parent case covers it")
def test_preflight_read_only_parent(here):
    (here / "ro").mkdir(mode=0o555)
    with pytest.raises(SpecError, match=r"prep.output: cannot be created: .* is not writable"):
        preflight(spec_in(here, BASE, ["prep.output=ro/out"]), "job.yaml")


def test_preflight_inputs_made_by_another_section_only_when_checking_the_whole_job(here):
    text = TRAIN.replace("path: v", "path: videos") + "eval_ae:\n  checkpoint: run\n  data: {manifest: {kind: " \
                                                     "folder, path: videos}}\n  output: run/eval\n"
    job = spec_in(here, text)
    preflight(job, "job.yaml")                                          # train_ae writes run/ before eval_ae
    with pytest.raises(SpecError, match="eval_ae.checkpoint: no such checkpoint"):
        preflight(job, "job.yaml", "eval_ae")
    preflight(job, "job.yaml", "train_ae")
    with pytest.raises(SpecError, match="job.yaml: prep: missing"):
        preflight(job, "job.yaml", "prep")
    assert STAGE_SECTIONS == ("prep", "selftest", "train_ae", "eval_ae", "train", "sample", "render")


def test_preflight_of_a_reparsed_section(here):
    """What StageJob does inside a submitted job: parse the frozen section again, check its paths there."""
    job = parse_spec(JobSpec, {"selftest": {"output": "a_file"}}, "specs/selftest.yaml")
    with pytest.raises(SpecError, match=r"^specs/selftest.yaml: selftest.output: is an existing file"):
        preflight(job, "specs/selftest.yaml", "selftest")


def test_name_source_once():
    error = name_source(UserError("data/x.csv: header: missing column 'name'"), "jobs/a.yaml")
    assert str(error) == "jobs/a.yaml: data/x.csv: header: missing column 'name'"
    assert str(name_source(error, "jobs/a.yaml")) == str(error)                 # already names it
    spec = SpecError("jobs/b.yaml", "prep.output", "bad")
    assert str(name_source(spec, "jobs/a.yaml")) == "jobs/b.yaml: prep.output: bad"

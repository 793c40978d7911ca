"""Resource values that would break out of a `#SBATCH` line, through the real CLI.

A newline in `resources.partition` (or account, qos, constraint, an sbatch_extra key or value) used to end the
`#SBATCH` line and put a command into the script, which then ran. Each case hides `touch CANARY` after the control
character: `hpcvid sbatch` and `hpcvid submit` must refuse the pipeline file with one line (exit 2) before writing
a script, creating a run folder or submitting anything, so the canary never appears.

Stand-ins for sbatch, srun, sacct, scancel and squeue come first on PATH, even on a machine with a real cluster:
they record every call and submit nothing, but the sbatch stand-in runs the script it is given with bash, as the
job would (srun being a stand-in too), and the sbatch test runs whatever scripts were written the same way, so an
injected command would really run. A valid pipeline with unusual values goes through the same stand-ins, to show
that they do see submissions and that each value stays on one line.
"""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from prep_helpers import assert_cli_ok, assert_user_error

FAKE_SLURM_COMMANDS = ("sbatch", "srun", "sacct", "scancel", "squeue")
FAKE_SBATCH = """#!/bin/bash
# stands in for sbatch: keeps the script it was given and runs it as the job would (srun is a stand-in too)
echo "sbatch $*" >> "$FAKE_SLURM_DIR/calls"
cp "${@: -1}" "$FAKE_SLURM_DIR/submitted-$$.sh"
bash "${@: -1}" > /dev/null 2>&1
echo "Submitted batch job 4242"
"""
FAKE_OTHER = """#!/bin/bash
echo "$(basename "$0") $*" >> "$FAKE_SLURM_DIR/calls"
"""


def injected(field: str, char: str, canary: Path) -> tuple[dict, str]:
    """Stage resources whose `field` hides `touch CANARY` after `char`, and the key path the error must name.
    The trailing ` #` comments out the closing quote that shlex.quote adds, so the command would really run."""
    payload = f"gpu{char}touch {canary} #"
    if field == "sbatch_extra key":
        return {"sbatch_extra": {f"comment{char}touch {canary} #": ""}}, "resources.sbatch_extra"
    if field == "sbatch_extra value":
        return {"sbatch_extra": {"comment": payload}}, "resources.sbatch_extra.comment"
    return {field: payload}, f"resources.{field}"


def write_pipeline(tmp_path: Path, resources: dict) -> Path:
    """One selftest stage (nothing to decode) with `resources`; runs would land in tmp_path/runs."""
    (tmp_path / "selftest.yaml").write_text(yaml.safe_dump({"selftest": {
        "output": str(tmp_path / "selftest"), "steps": 1, "step_seconds": 0.0}}))
    data = {"pipeline": {"name": "inj", "run_dir": str(tmp_path / "runs"), "stages": {
        "selftest": {"job": str(tmp_path / "selftest.yaml"), "resources": resources}}}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    assert yaml.safe_load(path.read_text()) == data    # the control characters survive the YAML round trip
    return path


@pytest.fixture
def fake_slurm(tmp_path) -> tuple[dict[str, str], Path]:
    """Environment with the stand-ins first on PATH, and the folder where they record calls and scripts."""
    bin_dir, record = tmp_path / "fake-slurm-bin", tmp_path / "fake-slurm"
    bin_dir.mkdir()
    record.mkdir()
    for name in FAKE_SLURM_COMMANDS:
        script = bin_dir / name
        script.write_text(FAKE_SBATCH if name == "sbatch" else FAKE_OTHER)
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_SLURM_DIR": str(record)}
    return env, record


def run_written_scripts(folder: Path, env: dict[str, str]) -> None:
    """Run every script in `folder` with bash, as sbatch would run a job (srun and sbatch are stand-ins)."""
    for script in sorted(folder.glob("*")) if folder.exists() else ():
        subprocess.run(["bash", str(script)], cwd=folder, env={**os.environ, **env}, capture_output=True, timeout=60)


def assert_refused(res, pipeline: Path, key: str, char: str) -> None:
    """Exit 2 and exactly one stderr line naming the file, the key path and the offending character."""
    assert_user_error(res, f"{pipeline}: pipeline.stages.selftest.{key}: ", repr(char))
    assert len(res.stderr.splitlines()) == 1, res.stderr


FIELDS = ["partition", "account", "qos", "constraint", "sbatch_extra key", "sbatch_extra value"]


@pytest.mark.parametrize("field, char", [(f, "\n") for f in FIELDS] + [
    ("partition", "\r"), ("qos", "\x1b"), ("sbatch_extra value", "\r"), ("sbatch_extra key", "\x0b"),
], ids=lambda v: repr(v).strip("'"))
def test_sbatch_refuses_injected_lines(run_cli, tmp_path, fake_slurm, field, char):
    env, _ = fake_slurm
    canary = tmp_path / "pwned"
    resources, key = injected(field, char, canary)
    pipeline = write_pipeline(tmp_path, resources)
    out = tmp_path / "scripts"
    res = run_cli(["sbatch", pipeline, "--out", out])
    run_written_scripts(out, env)
    assert not canary.exists(), "the injected command ran"
    assert_refused(res, pipeline, key, char)
    assert res.stdout == "" and not out.exists()


@pytest.mark.parametrize("cluster, field, char", [
    ("slurm", "partition", "\n"), ("slurm", "sbatch_extra key", "\n"), ("slurm", "constraint", "\r"),
    ("local", "account", "\n"), ("local", "sbatch_extra value", "\n"),
], ids=lambda v: repr(v).strip("'"))
def test_submit_refuses_injected_lines(run_cli, tmp_path, fake_slurm, cluster, field, char):
    env, record = fake_slurm
    canary = tmp_path / "pwned"
    resources, key = injected(field, char, canary)
    pipeline = write_pipeline(tmp_path, resources)
    res = run_cli(["submit", pipeline, "--cluster", cluster], env=env)
    assert not canary.exists(), "the injected command ran"
    assert_refused(res, pipeline, key, char)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "selftest").exists()
    assert list(record.iterdir()) == []


def test_submit_refuses_an_injected_set_override(run_cli, tmp_path, fake_slurm):
    """--set values are YAML: a double-quoted "\\n" is a newline, and gets the same check as the file's."""
    env, record = fake_slurm
    canary = tmp_path / "pwned"
    pipeline = write_pipeline(tmp_path, {})
    override = f'pipeline.stages.selftest.resources.qos="normal\\ntouch {canary}"'
    res = run_cli(["submit", pipeline, "--cluster", "slurm", "--set", override], env=env)
    assert_refused(res, pipeline, "resources.qos", "\n")
    assert not (tmp_path / "runs").exists() and list(record.iterdir()) == [] and not canary.exists()


def test_unusual_valid_values_are_submitted_on_one_line_each(run_cli, tmp_path, fake_slurm):
    """The stand-ins see a valid submission, and submitit's script keeps each value on its own #SBATCH line."""
    env, record = fake_slurm
    pipeline = write_pipeline(tmp_path, {
        "partition": "gpu-a100_long", "constraint": "a100&nvlink", "account": "proj.ml-2",
        "sbatch_extra": {"comment": "it's run #7; $(not a command)", "exclusive": ""}})
    res = run_cli(["submit", pipeline, "--cluster", "slurm"], env=env)
    assert_cli_ok(res)
    scripts = list(record.glob("submitted-*.sh"))
    assert len(scripts) == 1, (res.stdout, sorted(p.name for p in record.iterdir()))
    lines = scripts[0].read_text().splitlines()
    for expected in ("#SBATCH --partition=gpu-a100_long", "#SBATCH --constraint='a100&nvlink'",
                     "#SBATCH --account=proj.ml-2", "#SBATCH --comment='it'\"'\"'s run #7; $(not a command)'",
                     "#SBATCH --exclusive"):
        assert lines.count(expected) == 1, (expected, lines)
    assert all(line.isprintable() for line in lines)
    calls = (record / "calls").read_text().splitlines()
    assert any(call.startswith("srun ") for call in calls), calls    # the stand-in did run the script

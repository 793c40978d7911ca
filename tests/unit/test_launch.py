"""Pipeline specs, dependency order, StageJob pickling, and the sbatch scripts (quoting, kept in sync)."""
import pickle
import shlex
import subprocess
from pathlib import Path

import pytest

from hpcvid.config import SpecError
from hpcvid.launch.job import StageJob
from hpcvid.launch.pipeline import load_pipeline
from hpcvid.launch.sbatch import render_pipeline

ROOT = Path(__file__).resolve().parents[2]
JOB = """prep:
  manifest: {kind: folder, path: videos}
  output: out
"""


def write_pipeline(tmp_path, stages: str) -> Path:
    (tmp_path / "job.yaml").write_text(JOB)
    (tmp_path / "selftest.yaml").write_text("selftest: {output: st}\n")
    path = tmp_path / "pipe.yaml"
    path.write_text("pipeline:\n  name: t\n  stages:\n" + stages)
    return path


def test_order_follows_dependencies_and_specs_resolve(tmp_path):
    path = write_pipeline(tmp_path, """\
    check: {job: selftest.yaml, stage: selftest, after: [prep]}
    prep: {job: job.yaml, set: ["prep.clip.num_frames=8"], resources: {array_tasks: 3, cpus_per_task: 2}}
""")
    spec, planned = load_pipeline(path)
    assert [p.name for p in planned] == ["prep", "check"]
    assert planned[0].spec["clip"]["num_frames"] == 8 and planned[0].resources.array_tasks == 3
    assert planned[1].stage == "selftest" and planned[1].after == ["prep"]


@pytest.mark.parametrize("stages, key, words", [
    ("    prep: {job: job.yaml, after: [nope]}\n", "pipeline.stages.prep.after", "not a stage"),
    ("    a: {job: job.yaml, stage: prep, after: [b]}\n    b: {job: job.yaml, stage: prep, after: [a]}\n",
     "pipeline.stages.", "dependency cycle"),
    ("    x: {job: job.yaml, stage: paint}\n", "pipeline.stages.x.stage", "unknown stage 'paint'"),
    ("    check: {job: selftest.yaml, stage: selftest, resources: {array_tasks: 2}}\n",
     "pipeline.stages.check.resources.array_tasks", "does not split"),
    ("    prep: {job: job.yaml, resources: {gpus: 1}}\n", "pipeline.stages.prep.resources.gpus", "unknown key"),
    ("    prep: {job: job.yaml, resources: {time_min: 0}}\n", "pipeline.stages.prep.resources.time_min", "> 0"),
    ("    'a;rm': {job: job.yaml, stage: prep}\n", "pipeline.stages.a;rm", "letters, digits"),
])
def test_bad_pipelines_name_the_key(tmp_path, stages, key, words):
    path = write_pipeline(tmp_path, stages)
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert str(info.value).startswith(f"{path}: {key}") and words in str(info.value)


def test_stage_job_pickles_and_requeues_itself(tmp_path):
    job = StageJob("prep", {"manifest": {"kind": "folder", "path": "v"}, "output": "o"}, str(tmp_path), 1, 4)
    copy = pickle.loads(pickle.dumps(job))
    assert (copy.stage, copy.array_task, copy.array_count, copy.cwd) == ("prep", 1, 4, job.cwd)
    again = job.checkpoint()            # submitit's requeue hook: the same job, unchanged
    assert again.function.array_task == 1 and again.function.spec == job.spec


def test_sbatch_quotes_hostile_values(tmp_path):
    evil = "out/$(touch PWNED) `id` 'q\" ;rm -rf x"
    path = write_pipeline(tmp_path, f"""\
    prep:
      job: job.yaml
      set: [{json_str(f"prep.output={evil}")}]
      resources: {{array_tasks: 4, array_parallelism: 2, partition: "gpu; echo hi", mem_gb: 2}}
""")
    files = render_pipeline(str(path), tmp_path / "sb")
    script = (tmp_path / "sb" / "prep.sbatch").read_text()
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --mem=2048M" in script
    assert "#SBATCH --partition='gpu; echo hi'" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert shlex.split(srun) == ["srun", "--mpi=pmi2", "hpcvid", "prep", "job.yaml", "--set", f"prep.output={evil}"]
    for f in files:   # every generated script parses as bash
        assert subprocess.run(["bash", "-n", str(f)], capture_output=True).returncode == 0
    # run the command line through a real shell with `hpcvid` replaced by printf: nothing may execute
    fake = srun.replace("srun --mpi=pmi2 hpcvid", "printf '%s\\n'", 1)
    out = subprocess.run(["bash", "-c", fake], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.splitlines()[-1] == f"prep.output={evil}"
    assert not (tmp_path / "PWNED").exists()


def json_str(text: str) -> str:
    import json

    return json.dumps(text)


@pytest.mark.parametrize("name", ["quickstart", "selftest"])
def test_committed_sbatch_scripts_are_in_sync(tmp_path, name, monkeypatch):
    monkeypatch.chdir(ROOT)
    fresh = render_pipeline(f"jobs/pipeline_{name}.yaml", tmp_path / name)
    committed = ROOT / "slurm" / name
    for path in fresh:
        mine = path.read_text().replace(str(tmp_path / name), f"slurm/{name}")
        assert (committed / path.name).read_text() == mine, \
            f"slurm/{name}/{path.name} is stale: run `hpcvid sbatch jobs/pipeline_{name}.yaml --out slurm/{name}`"

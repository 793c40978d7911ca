"""Pipeline specs, dependency order, StageJob pickling, the sbatch scripts (quoting, kept in sync), and values that
would break out of a #SBATCH line (refused when loaded, and again where ours or submitit's scripts are written)."""
import dataclasses
import json
import pickle
import shlex
import subprocess
from pathlib import Path

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from hpcvid.config import SpecError, UserError
from hpcvid.launch.executors import SubmititExecutor, slurm_parameters
from hpcvid.launch.job import StageJob
from hpcvid.launch.pipeline import Resources, load_pipeline
from hpcvid.launch.sbatch import render_pipeline, render_stage

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
    ('    "a\\nb": {job: job.yaml, stage: prep, resources: {qos: "x\\ny"}}\n', "pipeline.stages.'a\\nb'", "letters"),
    # values and option names that end up in #SBATCH lines
    ('    prep: {job: job.yaml, resources: {partition: "gpu\\ntouch x"}}\n', "pipeline.stages.prep.resources.partition",
     "'\\n' at character 4"),
    ('    prep: {job: job.yaml, resources: {account: "a\\tb"}}\n', "pipeline.stages.prep.resources.account", "'\\t'"),
    ('    prep: {job: job.yaml, resources: {qos: "a\\x7fb"}}\n', "pipeline.stages.prep.resources.qos", "'\\x7f'"),
    ('    prep: {job: job.yaml, resources: {qos: "a\\u2028b"}}\n', "pipeline.stages.prep.resources.qos", "'\\u2028'"),
    ("    prep: {job: job.yaml, resources: {constraint: 'a\\b'}}\n", "pipeline.stages.prep.resources.constraint",
     "backslash"),
    ('    prep: {job: job.yaml, resources: {account: "café"}}\n', "pipeline.stages.prep.resources.account", "ASCII"),
    (f"    prep: {{job: job.yaml, resources: {{account: {'x' * 257}}}}}\n", "pipeline.stages.prep.resources.account",
     "at most 256"),
    ('    prep: {job: job.yaml, resources: {sbatch_extra: {comment: "a\\rb"}}}\n',
     "pipeline.stages.prep.resources.sbatch_extra.comment", "'\\r'"),
    ("    prep: {job: job.yaml, resources: {sbatch_extra: {comment: my HetJob}}}\n",
     "pipeline.stages.prep.resources.sbatch_extra.comment", "'hetjob'"),
    ('    prep: {job: job.yaml, resources: {sbatch_extra: {"x\\ny": ""}}}\n',
     "pipeline.stages.prep.resources.sbatch_extra", "'\\n' at character 2"),
    ("    prep: {job: job.yaml, resources: {sbatch_extra: {Mail_User: me}}}\n",
     "pipeline.stages.prep.resources.sbatch_extra", "'M' at character 1"),
    ("    prep: {job: job.yaml, resources: {sbatch_extra: {partition: gpu}}}\n",
     "pipeline.stages.prep.resources.sbatch_extra", "use resources.partition"),
    ("    prep: {job: job.yaml, resources: {sbatch_extra: {part: gpu}}}\n",
     "pipeline.stages.prep.resources.sbatch_extra", "read as --partition"),
    ("    prep: {job: job.yaml, resources: {sbatch_extra: {ntasks: '4'}}}\n",
     "pipeline.stages.prep.resources.sbatch_extra", "resources.nodes and resources.tasks_per_node"),
    ("    prep: {job: job.yaml, resources: {sbatch_extra: {hetjob: ''}}}\n",
     "pipeline.stages.prep.resources.sbatch_extra", "split the job"),
])
def test_bad_pipelines_name_the_key(tmp_path, stages, key, words):
    path = write_pipeline(tmp_path, stages)
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert str(info.value).startswith(f"{path}: {key}") and words in str(info.value)
    assert "\n" not in str(info.value)     # the CLI prints it as one line


@pytest.mark.parametrize("top, key, words", [
    ('name: "../up"', "pipeline.name", "not a usable name"),
    ("name: a/b", "pipeline.name", "not a usable name"),
    ("name: HetJob-1", "pipeline.name", "'hetjob'"),
    ('name: t\n  run_dir: "runs\\nx"', "pipeline.run_dir", "'\\n' at character 5"),
    ("name: t\n  run_dir: 'C:\\runs'", "pipeline.run_dir", "backslash"),
])
def test_pipeline_names_and_run_folders_must_fit_a_sbatch_line(tmp_path, top, key, words):
    """The run folder, <run_dir>/<name>-<stamp>, goes into submitit's #SBATCH --output line."""
    path = tmp_path / "pipe.yaml"
    path.write_text(f"pipeline:\n  {top}\n  stages:\n    prep: {{job: job.yaml}}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    assert str(info.value).startswith(f"{path}: {key}: ") and words in str(info.value)


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


@pytest.mark.parametrize("name", ["quickstart", "selftest", "render"])
def test_committed_sbatch_scripts_are_in_sync(tmp_path, name, monkeypatch):
    monkeypatch.chdir(ROOT)
    fresh = render_pipeline(f"jobs/pipeline_{name}.yaml", tmp_path / name)
    committed = ROOT / "slurm" / name
    for path in fresh:
        mine = path.read_text().replace(str(tmp_path / name), f"slurm/{name}")
        assert (committed / path.name).read_text() == mine, \
            f"slurm/{name}/{path.name} is stale: run `hpcvid sbatch jobs/pipeline_{name}.yaml --out slurm/{name}`"


def sbatch_options(script: str) -> list[str]:
    """The options sbatch reads from a script's #SBATCH lines, parsed the way sbatch does (src/sbatch/opt.c): up to
    the first command; quotes group, a backslash escapes the next character even inside quotes, and an unquoted '#'
    ends the line."""
    options = []
    for line in script.split("\n"):
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.lstrip().startswith("#"):
                break
            continue
        assert "hetjob" not in line.lower() and "packjob" not in line.lower(), line
        arg, quote, escaped = None, None, False
        for char in line[len("#SBATCH"):]:
            if escaped:
                arg, escaped = (arg or "") + char, False
            elif char == "\\":
                escaped = True
            elif quote:
                if char == quote:
                    quote = None
                else:
                    arg += char
            elif char in "'\"":
                quote, arg = char, arg or ""
            elif char == "#":
                break
            elif char.isspace():
                if arg is not None:
                    options.append(arg)
                arg = None
            else:
                arg = (arg or "") + char
        assert quote is None, f"unmatched quote: {line!r}"
        if arg is not None:
            options.append(arg)
    return options


def test_unusual_valid_values_stay_on_one_sbatch_line_in_both_scripts(tmp_path):
    """Constraint expressions, dashes, dots, quotes, '#', '&' and '$(...)' are fine: each value comes back whole from
    exactly one #SBATCH line of our script and of the one submitit would write."""
    resources = {"partition": "gpu-a100_long", "account": "proj.ml-2", "qos": "high+",
                 "constraint": "a100&nvlink|[rack1*2]",
                 "sbatch_extra": {"comment": 'it\'s run #7: "a" & $(b)', "mail-user": "me@example.org",
                                  "exclusive": ""}}
    entry = {"job": "selftest.yaml", "stage": "selftest", "resources": resources}
    path = write_pipeline(tmp_path, f"    check: {json.dumps(entry)}\n")
    _, planned = load_pipeline(path)
    render_pipeline(str(path), tmp_path / "sb")
    ours = (tmp_path / "sb" / "check.sbatch").read_text()
    theirs = _make_sbatch_string(command="true", folder=tmp_path / "logs" / "%j",
                                 **slurm_parameters(planned[0], ["42"]))
    expected = [f"--{key}={resources[key]}" for key in ("partition", "account", "qos", "constraint")]
    expected += ["--comment=it's run #7: \"a\" & $(b)", "--mail-user=me@example.org", "--exclusive"]
    for script in (ours, theirs):
        options = sbatch_options(script)
        assert all(options.count(option) == 1 for option in expected), options
        names = [option.split("=")[0] for option in options]
        assert len(names) == len(set(names)), names         # sbatch_extra repeats nothing hpcvid or submitit sets
        assert all(line.isprintable() for line in script.split("\n"))
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "--dependency=afterok:42" in sbatch_options(theirs)


def test_values_that_skipped_the_loader_are_refused_where_scripts_are_written(tmp_path):
    """A Resources built in code, or an sbatch_extra changed after loading (the dataclass is frozen, its dict is
    not), meets the same checks in the sbatch renderer and before submitit gets it."""
    path = write_pipeline(tmp_path, "    check: {job: selftest.yaml, stage: selftest}\n")
    _, planned = load_pipeline(path)
    built = dataclasses.replace(planned[0], resources=Resources(partition="gpu\ntouch x"))
    changed = dataclasses.replace(planned[0], resources=Resources())
    changed.resources.sbatch_extra["comment\ntouch x"] = ""
    for stage, key in ((built, "resources.partition"), (changed, "resources.sbatch_extra")):
        with pytest.raises(UserError, match=f"^stage check: {key}: .*'\\\\n' at character"):
            render_stage("t", str(path), stage, "selftest.yaml", [])
        for cluster in ("slurm", "local"):
            with pytest.raises(UserError, match=f"^stage check: {key}: "):
                SubmititExecutor(tmp_path / "logs", cluster)._executor(stage, [])
    assert not (tmp_path / "logs").exists()


def test_sbatch_renderer_refuses_any_line_with_a_control_character(tmp_path):
    """Whatever its source (here a job path and the output folder), no line with a newline is written; the
    pipeline file's path goes into a comment line, shown as a Python literal when it is not printable."""
    path = write_pipeline(tmp_path, "    check: {job: selftest.yaml, stage: selftest}\n")
    _, planned = load_pipeline(path)
    with pytest.raises(UserError, match=r"^stage check: line \d+ of the script would hold '\\n'"):
        render_stage("t", str(path), planned[0], "self\ntest.yaml", [])
    script = render_stage("t", "pipe\nline.yaml", planned[0], "selftest.yaml", [])
    assert "\n# Generated by `hpcvid sbatch 'pipe\\nline.yaml'`: change the pipeline file" in script
    out = tmp_path / "sb\nx"
    with pytest.raises(UserError, match=r"^submit_all.sh: line \d+ of the script would hold '\\n'"):
        render_pipeline(str(path), out)
    assert not out.exists()


def test_one_stage_registry_drives_the_cli_the_job_sections_and_sbatch():
    """Every registered stage is a CLI command (spelled as in sbatch scripts) and a job-file section, and nothing
    else is."""
    import dataclasses

    from hpcvid.cli import _parser
    from hpcvid.config import JobSpec
    from hpcvid.stages import STAGES

    assert [f.name for f in dataclasses.fields(JobSpec)] == list(STAGES)
    commands = _parser()._subparsers._group_actions[0].choices
    for stage in STAGES.values():
        assert stage.command in commands and commands[stage.command].description == stage.help
        assert stage.command == stage.name.replace("_", "-")

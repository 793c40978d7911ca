"""The `hpcvid` command: parse, load and validate the job spec, hand it to a stage.

    hpcvid check JOB.yaml [--set a.b=v ...]       validate a job file (and its paths) without running anything
    hpcvid prep JOB.yaml [--set a.b=v ...]        videos -> HDF5 latent shards (1 process, mpiexec ranks, or array tasks)
    hpcvid inspect DATASET_DIR [--verify] [--json]  summary of a prep dataset (--verify opens every shard)
    hpcvid submit PIPELINE.yaml [--cluster slurm|local|processes|debug] [--only STAGE] [--wait]
    hpcvid status RUN_DIR [--watch] | hpcvid cancel RUN_DIR | hpcvid retry RUN_DIR
    hpcvid sbatch PIPELINE.yaml --out DIR        plain sbatch scripts of a pipeline, for admins

User errors (bad spec, unusable manifest, wrong folder) print one line and exit with status 2; a run that stopped on
purpose (training diverged) prints one line and exits with status 3; a training run stopped by SIGUSR2/SIGTERM saves
a checkpoint, prints one line and exits with status 75 (run the same command again to resume). A stage command runs the same checks as
`hpcvid check` (spec and paths) on every rank before it starts, and refuses once, on every rank, with exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from hpcvid.config import (EXIT_PREEMPTED, EXIT_RUN_STOPPED, EXIT_USER_ERROR, JobSpec, Preempted, RunStopped,
                           UserError, error_line, load_job, preflight, to_dict)
from hpcvid.stages import STAGES          # the registry only: no stage module is imported here



def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcvid", description="Text-to-video pipeline stages as batch jobs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_spec(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("job", metavar="JOB.yaml", help="job spec file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override one key of the spec (repeatable); VALUE is parsed as YAML")
        return p

    check = with_spec("check", "validate a job file (every section) and the paths it names, without running anything")
    check.add_argument("--print", action="store_true", help="print the validated spec with defaults filled in")
    check.add_argument("--spec-only", action="store_true",
                       help="skip the path checks (inputs exist, outputs can be created), e.g. on a machine "
                            "without the data; the stages still run them when they start")
    for stage in STAGES.values():
        p = with_spec(stage.command, stage.help)
        if stage.name in ("sample", "render"):
            p.add_argument("--prompt", help="the text to render (verbatim: quotes, unicode and newlines stay)")
        if stage.name == "render":
            p.add_argument("--prompts", metavar="FILE", help="many videos: one prompt per line, or JSONL with "
                                                            "segment prompts and images (docs/rendering.md)")
    submit = sub.add_parser("submit", help="submit a pipeline of stages (jobs/pipeline_*.yaml)")
    submit.add_argument("pipeline", metavar="PIPELINE.yaml")
    submit.add_argument("--cluster", default="slurm", choices=["slurm", "local", "processes", "debug"],
                        help="slurm: submitit on SLURM; local: submitit local processes; processes: mpiexec / "
                             "spawned ranks; debug: in this process (default: slurm)")
    submit.add_argument("--only", action="append", metavar="STAGE", help="submit only these stages (repeatable)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a pipeline key, e.g. pipeline.stages.prep.resources.array_tasks=8")
    submit.add_argument("--wait", action="store_true", help="after submitting, watch the status until done")
    sb = sub.add_parser("sbatch", help="write plain sbatch scripts for a pipeline (for admins)")
    sb.add_argument("pipeline", metavar="PIPELINE.yaml")
    sb.add_argument("--out", required=True, metavar="DIR", help="folder for <stage>.sbatch and submit_all.sh")
    for name, text in (("status", "the state of a submitted run"), ("cancel", "cancel a run's active jobs"),
                       ("retry", "resubmit a run's failed tasks and the stages after them")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("run_dir", metavar="RUN_DIR")
        if name == "status":
            p.add_argument("--watch", action="store_true", help="refresh (backing off) until nothing is active")
            p.add_argument("--json", action="store_true")
    inspect = sub.add_parser("inspect", help="summarise a prep dataset folder")
    inspect.add_argument("dataset", metavar="DATASET_DIR")
    inspect.add_argument("--verify", action="store_true", help="open every shard and check shapes and counts")
    inspect.add_argument("--json", action="store_true", help="print the index as JSON")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as e:
        print(f"hpcvid {args.command}: {error_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunStopped as e:
        print(f"hpcvid {args.command}: {error_line(e)}", file=sys.stderr)
        return EXIT_RUN_STOPPED
    except Preempted as e:
        print(f"hpcvid {args.command}: {error_line(e)}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"hpcvid {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        return _inspect(Path(args.dataset), args.verify, args.json)
    if args.command in ("submit", "status", "cancel", "retry"):
        return _launch(args)
    if args.command == "sbatch":
        from hpcvid.launch.sbatch import render_pipeline

        for path in render_pipeline(args.pipeline, Path(args.out)):
            print(path)
        return 0
    stages = {stage.command: stage.name for stage in STAGES.values()}
    if args.command in stages:
        verbatim = {key: getattr(args, key) for key in ("prompt", "prompts") if getattr(args, key, None) is not None}
        return _run_stage(stages[args.command], args.job, args.overrides, verbatim)
    if args.command == "check":
        job: JobSpec = load_job(args.job, args.overrides)
        if not args.spec_only:
            preflight(job, args.job)
        sections = [name for name, value in vars(job).items() if value is not None]
        if args.print:
            print(json.dumps(to_dict(job), indent=2))
        print(f"{args.job}: ok ({', '.join(sections)}{'; paths not checked' if args.spec_only else ''})")
        return 0
    raise AssertionError(f"unhandled command {args.command}")   # argparse restricts the choices


def _launch(args: argparse.Namespace) -> int:
    from hpcvid.launch import rundir

    if args.command == "submit":
        run_dir = rundir.submit_pipeline(args.pipeline, args.cluster, args.only, tuple(args.overrides))
        rows = rundir.watch(run_dir) if args.wait else rundir.status_rows(run_dir)
        if not args.wait:
            print(rundir.format_status(rows))
        print(f"run folder: {run_dir}   (hpcvid status {run_dir})")
        return 0 if all(r["state"] in rundir.ACTIVE | {"COMPLETED"} for r in rows) else 1
    if args.command == "status":
        rows = rundir.watch(args.run_dir) if args.watch else rundir.status_rows(args.run_dir)
        if args.json:
            print(json.dumps(rows, indent=1))
        elif not args.watch:
            print(rundir.format_status(rows))
        return 0
    if args.command == "cancel":
        print(f"hpcvid cancel: {rundir.cancel(args.run_dir)} job(s) cancelled")
        return 0
    todo = rundir.retry(args.run_dir)
    print(f"hpcvid retry: {', '.join(f'{k} {v}' for k, v in todo.items()) or 'nothing to retry'}")
    return 0


def _run_stage(stage: str, job_path: str, overrides: list[str], verbatim: Optional[dict[str, str]] = None) -> int:
    """Run a stage on this rank (hpcvid.stages.runner); a spec refused at start is printed once, by rank 0.
    `verbatim` (--prompt, --prompts) replaces those keys of the stage's section as they are (not through YAML,
    which would read 'a: b' as a mapping)."""
    import dataclasses

    from hpcvid.dist import Env
    from hpcvid.stages.runner import StageRefused, run_stage

    def load() -> JobSpec:
        job = load_job(job_path, overrides)
        section = getattr(job, stage, None)
        if verbatim and section is not None:
            job = dataclasses.replace(job, **{stage: dataclasses.replace(section, **verbatim)})
        return job

    try:
        run_stage(stage, load, job_path, Env.discover())
    except StageRefused as e:
        if e.rank == 0:
            print("\n".join(f"hpcvid {STAGES[stage].command}: {line}" for line in e.lines), file=sys.stderr,
                  flush=True)
        return EXIT_USER_ERROR
    return 0   # bad videos are data (failures.jsonl), not a failed job


def _inspect(folder: Path, verify: bool, as_json: bool) -> int:
    from hpcvid.data import shards as sh
    from hpcvid.data.shard_file import ShardFormatError, ShardReader
    from hpcvid.stages.prep import human_bytes

    if not (folder / "dataset.json").is_file():
        raise UserError(f"{folder}: not an hpcvid dataset (no dataset.json)")
    index = sh.rebuild_index(folder)
    if as_json:
        print(json.dumps(index, indent=1))
        return 0
    t = index["totals"]
    print(f"dataset {folder}")
    print(f"  encoder {json.dumps(index['encoder'])}; latent {index['latent']['dtype']} "
          f"{index['latent']['shapes']}; text {index['text']}")
    print(f"  shards {index['complete_shards']}/{index['num_shards']} complete"
          f"{'' if index['complete'] else ' (INCOMPLETE: rerun prep)'}; {human_bytes(t['bytes'])}")
    print(f"  rows {t['rows']} of {index['total_rows']}: done {t['done']}, filtered {t['filtered']}, "
          f"failed {t['failed']}; clips {t['clips']}")
    for name, n in sorted(index["buckets"].items()):
        print(f"  bucket {name}: {n} clips")
    for status in ("failed", "filtered"):
        for reason, n in sorted(index["reasons"][status].items()):
            print(f"  {status} {reason}: {n}")
    for code, n in sorted(index.get("warnings", {}).items()):
        print(f"  warning {code}: {n}   (clips kept; details in {folder / 'warnings.jsonl'})")
    if t["clips"]:
        per_clip = {k: v / t["clips"] for k, v in sh.dataset_field_bytes(folder, index).items()}
        fields = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(per_clip.items(), key=lambda kv: -kv[1]))
        print(f"  bytes per clip {human_bytes(sum(per_clip.values()))}: {fields}")
    if verify:
        bad = 0
        for entry in index["shards"]:
            try:   # reads every clip: shapes, offsets, and every stored picture decoded
                with ShardReader(folder / entry["file"]) as shard:
                    shard.validate(index["latent"]["shapes"])
                    n = sum(1 for _ in shard)
                if n != entry["clips"]:
                    raise ShardFormatError(f"{entry['file']}: {n} clips stored, marker says {entry['clips']}")
            except ShardFormatError as e:
                bad += 1
                print(f"  BAD {e}")
        print(f"  verified {len(index['shards']) - bad}/{len(index['shards'])} shards")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

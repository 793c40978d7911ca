"""One stage on this rank, run the same way whatever launched it (the `hpcvid` command, or a StageJob under
submitit or local processes): load and check the spec, refuse together, run, tear down together.

    result = run_stage("prep", lambda: load_job(path, overrides), path, Env.discover())

Every rank checks the spec and its paths (preflight) before anything heavy is imported; if any rank found a
problem, all of them stop with StageRefused (the caller prints its lines once, from rank 0, and exits 2). Once the
stage runs, a failing rank takes the others down with it (dist.fail_together) instead of leaving them waiting.
"""
from __future__ import annotations

import traceback
from typing import Any, Callable, Optional

from hpcvid.config import JobSpec, Preempted, UserError, error_line, name_source, preflight
from hpcvid.dist import Env, destroy_torch_distributed, fail_together, make_comm, start_together

# status(state, fields): told "RUNNING" before the stage starts, "FAILED" (error, trace) when it is refused or fails
StatusHook = Callable[..., None]


class StageRefused(UserError):
    """Every rank refused to start: `lines` are the distinct problems (printed once, by rank 0)."""

    def __init__(self, lines: list[str], problem: Optional[UserError], rank: int):
        super().__init__("\n".join(lines))
        self.lines, self.problem, self.rank = lines, problem, rank


def run_stage(name: str, load: Callable[[], JobSpec], source: str, env: Env,
              status: Optional[StatusHook] = None) -> Any:
    """Run stage `name` of the job that `load()` reads (a UserError from it is a refusal) on this rank."""
    spec, problem = None, None
    try:
        job = load()
        spec = job.stage(name, source)
        preflight(job, source, name)
    except UserError as e:
        problem = e
    if status is not None:
        status("RUNNING")
    comm = make_comm(env)
    refused = start_together(comm, None if problem is None else error_line(problem))
    if refused:
        if status is not None:   # the status table shows the key and what is wrong (it cuts lines at 160)
            mine = f"{problem.key}: {problem.message}" if getattr(problem, "key", "") else str(problem or "")
            status("FAILED", error=mine or f"refused: {refused[0]}")
        comm.close()
        raise StageRefused(refused, problem, comm.rank)
    from hpcvid.stages import get_stage     # after the checks: a refused spec does not wait for torch to import

    stage = get_stage(name)
    return run_on_ranks(stage.run, spec, env, comm, f"hpcvid {stage.command}", source, status)


def run_on_ranks(run: Callable[..., Any], spec: Any, env: Env, comm, what: str, source: Optional[str] = None,
                 status: Optional[StatusHook] = None) -> Any:
    """run(spec, env, comm) on this rank, then tear torch.distributed down together; if it fails on any rank of a
    multi-rank job, every rank is aborted (dist.fail_together) instead of hanging. A user error names `source`."""
    try:
        result = run(spec, env, comm)
        destroy_torch_distributed(comm)      # together, before any rank exits
    except Preempted:                        # every rank saved and stopped together: a clean end, not a failure
        destroy_torch_distributed(comm)
        comm.close()
        raise
    except BaseException as e:
        if status is not None:
            status("FAILED", error=f"{type(e).__name__}: {e}".splitlines()[0], trace=traceback.format_exc(limit=8))
        if isinstance(e, UserError) and source:
            name_source(e, source)
        fail_together(comm, env, e, what)
        raise
    comm.close()
    return result

"""The stages, by name. Each is `run(spec, env, comm) -> result` in its own module; launchers find them here.

`comm` says how a stage's ranks talk: "mpi" stages use MPI when launched under it and torch.distributed (gloo/NCCL)
otherwise; "torch" stages always bring up torch.distributed. `array` says the stage splits its work over SLURM
array tasks. `progress(spec)` reads a stage's own progress files (for `hpcvid status`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class StageInfo:
    name: str
    module: str
    comm: str          # "mpi" | "torch"
    array: bool        # work splits over array tasks
    trains: bool       # long-running with checkpoints: requeue on preemption/time limit

    def load(self):
        return importlib.import_module(self.module)

    @property
    def run(self) -> Callable[..., Any]:
        return self.load().run


STAGES: dict[str, StageInfo] = {
    "prep": StageInfo("prep", "hpcvid.stages.prep", comm="mpi", array=True, trains=False),
    "selftest": StageInfo("selftest", "hpcvid.stages.selftest", comm="torch", array=False, trains=True),
    "train_ae": StageInfo("train_ae", "hpcvid.stages.train_ae", comm="torch", array=False, trains=True),
    "eval_ae": StageInfo("eval_ae", "hpcvid.stages.eval_ae", comm="mpi", array=False, trains=False),
}


def get_stage(name: str) -> StageInfo:
    from hpcvid.config import UserError

    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]

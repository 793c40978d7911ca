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
    name: str          # the job file's section and the pipeline's stage name
    module: str
    comm: str          # "mpi" | "torch"
    array: bool        # work splits over array tasks
    trains: bool       # long-running with checkpoints: requeue on preemption/time limit
    help: str          # one line for `hpcvid --help`

    @property
    def command(self) -> str:
        """The CLI command and the sbatch scripts' spelling: train_ae -> train-ae."""
        return self.name.replace("_", "-")

    def load(self):
        return importlib.import_module(self.module)

    @property
    def run(self) -> Callable[..., Any]:
        return self.load().run


# The one list of stages: the CLI's stage commands, the job file's sections (hpcvid.config.JobSpec has one field
# per entry; a test holds them together) and the names in pipelines and sbatch scripts all come from here.
STAGES: dict[str, StageInfo] = {s.name: s for s in (
    StageInfo("prep", "hpcvid.stages.prep", comm="mpi", array=True, trains=False,
              help="turn videos into HDF5 latent shards"),
    StageInfo("selftest", "hpcvid.stages.selftest", comm="torch", array=False, trains=True,
              help="check ranks, rendezvous and requeue on an allocation (a tiny resumable job)"),
    StageInfo("train_ae", "hpcvid.stages.train_ae", comm="torch", array=False, trains=True,
              help="train a video autoencoder (Reducio-VAE or CMD) on decoded clips, resumable"),
    StageInfo("eval_ae", "hpcvid.stages.eval_ae", comm="mpi", array=False, trains=False,
              help="reconstruction PSNR/SSIM, compression and a contact sheet of a trained autoencoder"),
    StageInfo("train", "hpcvid.stages.train", comm="torch", array=False, trains=True,
              help="train a keyframe or motion DiT with (pyramidal) flow matching on a prep dataset, resumable"),
    StageInfo("sample", "hpcvid.stages.sample", comm="mpi", array=False, trains=False,
              help="one short video from a prompt: keyframes, then each clip's motion, decoded to an mp4"),
    StageInfo("render", "hpcvid.stages.render", comm="mpi", array=True, trains=False,
              help="long videos over MPI ranks: clip-parallel keyframes, each rank its clips' motion, one mp4"),
)}


def get_stage(name: str) -> StageInfo:
    from hpcvid.config import UserError

    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]

"""Where this process sits in a job (`Env`, env.py) and how it talks to its peers (`Comm`, comm.py).

Stages never ask how they were launched: they get an `Env` read from the launcher's variables (MPI, torchrun,
SLURM or nothing) and a `Comm` that hides whether mpi4py, torch.distributed or a single process carries messages.
"""
from hpcvid.dist.comm import (BACKENDS, OPS, Comm, LocalComm, MPIComm, Pending, TorchComm, destroy_torch_distributed,
                              fail_together, init_torch_distributed, make_comm, start_together)
from hpcvid.dist.env import LAUNCHERS, Env, rank_cores

__all__ = ["BACKENDS", "LAUNCHERS", "OPS", "Comm", "Env", "LocalComm", "MPIComm", "Pending", "TorchComm",
           "destroy_torch_distributed", "fail_together", "init_torch_distributed", "make_comm", "rank_cores",
           "start_together"]

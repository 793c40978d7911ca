"""The selftest stage: is this allocation usable for distributed training?

Checks that every rank joins torch.distributed (gloo on CPU, NCCL where GPUs are visible), that an all-reduce gives
the right sum, and which hosts and devices the ranks see; then runs a resumable loop of short steps with an atomic
checkpoint after each, like a training stage, so preemption and requeue can be tried on a cluster before spending
GPU hours. Launch as any stage: `hpcvid selftest JOB.yaml`, or in a pipeline with tasks_per_node > 1.
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hpcvid.config import SelftestSpec
from hpcvid.io import atomic_write_json, read_json
from hpcvid.dist import Comm, Env, init_torch_distributed


@dataclass
class SelftestResult:
    world_size: int
    hosts: list[str]
    allreduce_ok: bool
    start_step: int              # > 0 when this run resumed from a checkpoint
    steps: int
    restarts: int
    summary: str


def run(spec: SelftestSpec, env: Env, comm: Comm) -> SelftestResult:
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    init_torch_distributed(env, comm)
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", env.local_rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([float(env.rank + 1)], device=device)
    torch.distributed.all_reduce(value)
    expected = env.world_size * (env.world_size + 1) / 2
    hosts = comm.all_gather(socket.gethostname())
    if value.item() != expected:
        raise RuntimeError(f"all_reduce gave {value.item()}, expected {expected}")

    state_path = out / "selftest_state.json"
    state = read_json(state_path) or {"step": 0, "runs": 0}
    start_step = state["step"]
    if env.is_main:
        atomic_write_json(state_path, {**state, "runs": state["runs"] + 1})
    comm.barrier()
    for step in range(start_step, spec.steps):
        if spec.fail_at_step is not None and step == spec.fail_at_step:
            raise RuntimeError(f"selftest: failing at step {step} as asked (fail_at_step)")
        time.sleep(spec.step_seconds)       # stands in for a training step
        tick = torch.ones(1, device=device)
        torch.distributed.all_reduce(tick)
        comm.barrier()
        if env.is_main:   # checkpoint after every step, like a training loop would every k steps
            atomic_write_json(state_path, {"step": step + 1, "runs": state["runs"] + 1})
    summary = (f"selftest: {env.world_size} ranks on {len(set(hosts))} host(s) ({', '.join(sorted(set(hosts)))}), "
               f"backend {backend}, all_reduce ok; steps {start_step}->{spec.steps}, run {state['runs'] + 1}")
    result = SelftestResult(env.world_size, hosts, True, start_step, spec.steps, state["runs"], summary)
    if env.is_main:
        atomic_write_json(out / "selftest_report.json", json.loads(json.dumps(result.__dict__)))
        print(summary, flush=True)
    return result

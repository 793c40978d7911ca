"""The training loop both trainers share (train_ae, train): each stage supplies only its step and its save.

    loop = TrainLoop(name="train-ae", section="train_ae", steps=..., log_every=..., checkpoint_every=...,
                     max_nonfinite_steps=..., env=env, comm=comm, device=device, log=TrainingLog(...))
    outcome = loop.run(start_step, step_fn, save_fn, folder=resumed_folder, lr=spec.lr)

step_fn(step) -> (terms, skipped, tokens): one optimizer step; `skipped` is the same on every rank (the stage decides
it from an all-reduced flag); `tokens` on this rank (0 when the stage does not count them).
save_fn(done, extra) -> folder: a collective checkpoint; never called while the newest steps are non-finite.

What the loop decides, the same way for both: the interval's means over applied steps and over the ranks (through
Comm: no backend-specific reductions), the progress bar, the non-finite streak (a warning at its start, RunStopped
after max_nonfinite_steps in a row or when the run would end inside one), the checkpoint cadence, and preemption:
after each step every rank learns whether any got SIGUSR2/SIGTERM, saves, and hands the signal on
(hpcvid.train.preempt).
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from hpcvid.config import RunStopped
from hpcvid.train.metrics import TrainingLog, strict_record
from hpcvid.train.preempt import PreemptionFlag

StepFn = Callable[[int], tuple[dict[str, float], bool, int]]
SaveFn = Callable[[int, dict[str, Any]], Path]


@dataclass
class LoopOutcome:
    times: list[float] = field(default_factory=list)     # seconds of this run's steps
    last: Optional[dict[str, Any]] = None                # the last logged record
    skipped: int = 0                                     # non-finite steps skipped in this run
    folder: Optional[Path] = None                        # the newest checkpoint (resumed or saved)
    tokens_per_step: int = 0                             # this rank's, at the last step


class TrainLoop:
    def __init__(self, *, name: str, section: str, steps: int, log_every: int, checkpoint_every: int,
                 max_nonfinite_steps: int, env, comm, device: torch.device, log: TrainingLog, progress: bool,
                 flops_per_token: float = 0.0, peak_tflops: Optional[float] = None, postfix: tuple[str, ...] = ("loss",),
                 after_step: Optional[Callable[[int], None]] = None):
        self.name, self.section, self.steps = name, section, steps
        self.log_every, self.checkpoint_every, self.max_nonfinite = log_every, checkpoint_every, max_nonfinite_steps
        self.env, self.comm, self.device, self.log = env, comm, device, log
        self.progress, self.postfix, self.after_step = progress, postfix, after_step
        self.flops_per_token, self.peak = flops_per_token, peak_tflops
        self.start = time.time()

    def warn(self, message: str) -> None:
        if self.env.is_main:
            print(f"hpcvid {self.name}: warning: {message}", file=sys.stderr, flush=True)

    def _record(self, done: int, interval: list[tuple[dict[str, float], bool, float, int]]) -> dict[str, Any]:
        """Means over the interval's applied steps (its skipped ones when none was applied, which shows their NaN/inf
        as null) and over the ranks; the lr of its last step; throughput and MFU when the stage counts tokens."""
        applied = [t for t, skipped, _, _ in interval if not skipped] or [t for t, _, _, _ in interval]
        keys = sorted(set().union(*applied) - {"lr"})
        row = [sum(t.get(k, 0.0) for t in applied) / len(applied) for k in keys]
        row += [sum(s for _, _, s, _ in interval), sum(n for _, _, _, n in interval)]
        total = self.comm.all_reduce(np.array(row, np.float64), op="sum")
        world = self.env.world_size
        seconds = float(total[-2]) / world                                      # mean over the ranks
        record = {"step": done, **{k: round(float(v) / world, 6) for k, v in zip(keys, total[:-2])},
                  "skipped": sum(1 for _, s, _, _ in interval if s), "lr": interval[-1][0].get("lr"),
                  "sec_per_step": round(seconds / len(interval), 4)}
        tokens = float(total[-1])
        if tokens:
            record["tokens_per_s"] = round(tokens / max(seconds, 1e-9), 1)
            if self.peak and self.flops_per_token:
                record["mfu"] = round(self.flops_per_token * tokens / max(seconds, 1e-9) / world
                                      / (self.peak * 1e12), 5)
        record["time"] = round(time.time() - self.start, 2)
        return strict_record(record)

    def run(self, start_step: int, step_fn: StepFn, save_fn: SaveFn, folder: Optional[Path] = None,
            lr: Optional[float] = None, extra: Optional[dict[str, Any]] = None) -> LoopOutcome:
        out = LoopOutcome(folder=folder)
        bar = None
        if self.env.is_main and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.steps, initial=start_step, unit="step", desc=self.name, dynamic_ncols=True,
                       mininterval=1.0)
        interval: list[tuple[dict[str, float], bool, float, int]] = []
        streak = 0
        advice = f"lower {self.section}.lr" + (f" (now {lr:g})" if lr is not None else "")
        try:
            with PreemptionFlag() as flag:
                for step in range(start_step, self.steps):
                    t = time.perf_counter()
                    terms, skipped, tokens = step_fn(step)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    seconds = time.perf_counter() - t
                    out.times.append(seconds)
                    out.tokens_per_step = tokens
                    interval.append((terms, skipped, seconds, tokens))
                    streak = streak + 1 if skipped else 0
                    out.skipped += skipped
                    done = step + 1
                    if streak == 1:
                        self.warn(f"step {done} skipped (no update): a non-finite loss or gradient norm on some rank "
                                  f"(rank 0: loss {terms.get('loss', float('nan')):.4g}, gradient norm "
                                  f"{terms.get('grad_norm', float('nan')):.4g}); {self.max_nonfinite} in a row stop "
                                  f"the run")
                    stop = streak >= self.max_nonfinite
                    if done % self.log_every == 0 or done == self.steps or stop:
                        out.last = self._record(done, interval)
                        interval.clear()
                        self.log.write(out.last)
                        if bar is not None and out.last.get("loss") is not None:
                            bar.set_postfix({k: f"{out.last[k]:.4g}" for k in self.postfix
                                             if out.last.get(k) is not None}, refresh=False)
                    if bar is not None:
                        bar.update(1)
                    if stop:
                        raise RunStopped(
                            f"diverged: {streak} steps in a row ({done - streak + 1}..{done}) had a non-finite loss "
                            f"or gradient norm ({self.section}.max_nonfinite_steps {self.max_nonfinite}); they were "
                            f"skipped and not saved; newest good checkpoint: {out.folder or 'none'}; {advice} or "
                            f"add warmup_steps/grad_clip, then rerun")
                    preempted = flag.anywhere(self.comm)
                    if streak == 0 and (done % self.checkpoint_every == 0 or done == self.steps or preempted):
                        out.folder = save_fn(done, {**(extra or {}), "metrics": out.last})
                    if self.after_step is not None:
                        self.after_step(done)
                    if preempted and done < self.steps:      # a signal during the last step: the run is complete
                        if interval:
                            out.last = self._record(done, interval)
                            interval.clear()
                            self.log.write(out.last)
                        flag.hand_on()                       # submitit requeues and exits; otherwise Preempted
            if streak:          # the weights the run ends with gave non-finite values on its last batches
                raise RunStopped(
                    f"the run reached step {self.steps} with its last {streak} step(s) non-finite (skipped); the "
                    f"final state was not saved; newest good checkpoint: {out.folder or 'none'}; rerun with a higher "
                    f"{self.section}.steps to get past them, or {advice}")
        finally:
            self.log.close()
            if bar is not None:
                bar.close()
        return out

    def median_step(self, outcome: LoopOutcome) -> Optional[float]:
        return round(statistics.median(outcome.times), 4) if outcome.times else None

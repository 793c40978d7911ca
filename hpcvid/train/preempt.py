"""Preemption: stop at the end of the step in flight, save, and leave the way the launcher expects.

SLURM warns a job before its time limit or a preemption with a signal (USR2 when asked with --signal, TERM when
killed); submitit turns USR2 into "call checkpoint() and requeue". A training loop cannot be cut mid-step (ranks wait
for each other inside collectives), so the handler only raises a flag; the loop asks every rank for it after each
step (one small all-reduce), saves a checkpoint, and then hands the signal on to the handler that was there before
ours: submitit's requeues the job and exits; without one, the stage ends with `Preempted` (the CLI exits with
EXIT_PREEMPTED, 75, "try again later") and the rerun resumes.
"""
from __future__ import annotations

import signal
from typing import Any, Optional

import numpy as np

from hpcvid.config import Preempted

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionFlag:
    """Installs itself for SIGUSR2 and SIGTERM while the loop runs (a context manager) and remembers the handlers
    it replaced, to hand the signal on once the state is saved."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionFlag":
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._raise_flag)
            except ValueError:            # not the main thread (an in-process debug run): no handler, no flag
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _raise_flag(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def anywhere(self, comm) -> bool:
        """Whether any rank got a signal: the same answer on every rank (they save together)."""
        return bool(comm.all_reduce(np.array([0 if self.signum is None else 1], np.int64), op="max")[0])

    def hand_on(self) -> None:
        """After saving: let the handler we replaced (submitit's requeue) act on the signal, then stop the run."""
        signum = self.signum if self.signum is not None else signal.SIGUSR2
        previous = self._previous.get(signum)
        self.__exit__()
        if callable(previous):
            previous(signum, None)        # submitit: checkpoint(), requeue, exit (rank 0); returns on the others
        raise Preempted(f"stopped on {signal.Signals(signum).name} after saving; run the same command again to "
                        f"resume")

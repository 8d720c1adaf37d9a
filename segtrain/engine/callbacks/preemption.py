"""Preemption: a stop signal (``kill``, SLURM's preemption or its warning before the time
limit) ends the run cleanly at the next step, with ``last.pt`` saved, instead of killing it
mid-step; under submitit (Hydra's SLURM launcher) the job then exits so that SLURM requeues
it and the requeued job resumes (``trainer.resume=auto``)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from segtrain.engine.callbacks.base import Callback

if TYPE_CHECKING:
    from segtrain.engine.trainer import Trainer

log = logging.getLogger("segtrain")

# SIGTERM: kill / SLURM preemption; SIGUSR1, SIGUSR2: SLURM's warning before the time limit
# (submitit asks for USR2 and requeues the job from its own handler).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preemption(Callback):
    """Turns a stop signal into ``trainer.request_stop`` while the trainer runs, then hands
    the signal on to the handler it replaced. Put it last in the trainer's list: its end
    under submitit exits the process, after the other callbacks have closed their files."""

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.received: int | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        def stop(signum, frame) -> None:  # noqa: ARG001 - signal API
            self.received = signum
            trainer.request_stop(signum)

        self.previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if status != "interrupted":
            return
        # hand the signal on (submitit's handler requeues the job and exits)
        handler = self.previous.get(self.received)
        if callable(handler):
            handler(self.received, None)
        if os.environ.get("SUBMITIT_FOLDER"):
            # a submitit job that SLURM preempts is requeued by SLURM itself: ending without
            # a result keeps the waiting launcher waiting for the requeued job's result,
            # instead of recording this unfinished one
            log.warning("stopped by %s at iteration %d: exiting without a result; the "
                        "requeued job resumes from last.pt", trainer.stop_cause,
                        trainer.iteration)
            sys.exit(1)

"""Preemption: a stop signal (Ctrl-C, ``kill``, SLURM's preemption or its warning before the
time limit) ends the run cleanly at the next step boundary, with ``last.pt`` saved, instead of
killing it mid-step; a second Ctrl-C ends it at once (a KeyboardInterrupt: nothing saved,
the last.pt on disk stays whole). The handlers it replaced are back once ``fit`` returns;
the entry point then hands the signal on to them (``segtrain.cli.exit_stopped``: under
submitit, Hydra's SLURM launcher, its handler requeues the job and the requeued job resumes
with ``trainer.resume=auto``)."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from segtrain.engine.callbacks.base import Callback

if TYPE_CHECKING:
    from segtrain.engine.trainer import Trainer

# SIGINT: Ctrl-C; SIGTERM: kill / SLURM preemption; SIGUSR1, SIGUSR2: SLURM's warning before
# the time limit (submitit asks for USR2 and requeues the job from its own handler).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preemption(Callback):
    """Turns a stop signal into ``trainer.request_stop`` while the trainer runs (a second
    SIGINT into a KeyboardInterrupt), then puts back the handlers it replaced."""

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.received: int | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        def stop(signum, frame) -> None:  # noqa: ARG001 - signal API
            if signum == signal.SIGINT and self.received == signal.SIGINT:
                raise KeyboardInterrupt  # Ctrl-C twice: now
            self.received = signum
            trainer.request_stop(signum)

        self.previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

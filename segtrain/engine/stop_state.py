"""The training loop's stop state: one object holds what a run was asked to stop by (a
signal, or a hyper-parameter search's pruner), whether the loop stops after the current
step, the status ``Trainer.fit`` then returns and the one line that says so."""

from __future__ import annotations

import signal
from pathlib import Path

#: what ``Trainer.fit`` returns (and ``on_fit_end`` gets): the run reached max_iters, it
#: stopped at a step boundary on request (last.pt saved), a search's pruner ended it at a
#: step boundary (last.pt saved), or it raised
FINISHED, STOPPED, PRUNED, FAILED = "finished", "stopped", "pruned", "failed"


class StopState:
    """The loop's stop bookkeeping in one place: what this process was asked to stop by (a
    signal, or a hyper-parameter search's pruner), the status ``fit`` returns for it, whether
    the loop stops after this step (one process: as soon as asked; several ranks: when they
    agree at a check point; a prune: every rank got the same decision at the same
    evaluation), and the one line that says so."""

    def __init__(self) -> None:
        self.signal: int | None = None  # a stop signal this process received
        self.pruned_at: int | None = None  # the evaluation a search's pruner stopped it at
        self.status: str | None = None  # what fit returns when this request ends the run
        self.reason: str | None = None  # why, in words
        self.now = False  # the loop stops after the current step

    def request(self, signum: int | None = None, *, status: str = STOPPED,
                reason: str | None = None) -> None:
        """Stop at the next step boundary, saving last.pt: asked by signal ``signum``, or
        for ``reason``; ``fit`` then returns ``status``."""
        self.signal, self.status = signum, status
        self.reason = reason or f"signal {signum} received ({signal.Signals(signum).name})"

    def prune(self, iteration: int) -> None:
        """End the run after this step as PRUNED (every rank calls it at the same step)."""
        self.pruned_at = iteration
        self.request(status=PRUNED, reason=f"the search's pruner (hydra.sweeper.pruner) "
                                           f"stopped this trial after its evaluation at "
                                           f"iteration {iteration}")

    @property
    def requested(self) -> bool:
        return self.status is not None

    @property
    def ended_as(self) -> str:
        """The status of a run this stop ended (a rank that was not asked itself: STOPPED)."""
        return self.status or STOPPED

    @property
    def cause(self) -> str:
        return self.reason or "another rank received a stop signal"

    def text(self, iteration: int, run_dir: Path) -> str:
        return (f"{self.cause}: saved checkpoints/last.pt at iteration {iteration}; resume "
                f"with trainer.resume={run_dir}")

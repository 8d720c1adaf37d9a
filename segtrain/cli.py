"""What the command-line entry points share: a ``UserError`` becomes one line, not a traceback.

``python -m segtrain``, ``segtrain.evaluate``, ``segtrain.predict`` and ``segtrain.export`` run
their body in ``user_errors()``. The only segtrain module besides the entry points themselves
that knows Hydra's run modes; ``segtrain.errors`` stays free of Hydra.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode

from segtrain.errors import UserError, from_worker, plain_message

log = logging.getLogger("segtrain")


class FailedJobError(CompactHydraException):
    """A sweep job's ``UserError``: Hydra reports a ``CompactHydraException`` at the end of
    the sweep by its message alone, without a traceback."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Around the body of a Hydra entry point: a ``UserError`` ends a single run with its
    message on stderr and exit status 1, no traceback. In a sweep it is logged in the job's
    log and re-raised as a ``FailedJobError``, so Hydra records that job as failed, runs the
    others, and names the failed job's overrides and message at the end.
    A Ctrl-C that reaches it (a KeyboardInterrupt: training handles the first one itself)
    ends with one line and status 130. ``HYDRA_FULL_ERROR=1`` re-raises the original error
    to show its traceback."""
    try:
        yield
    except UserError as err:
        message = plain_message(err)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("%s", message)
            raise FailedJobError(str(from_worker(err))) from None
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        sys.exit(getattr(err, "exit_status", 1))
    except KeyboardInterrupt:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.stderr.write("error: interrupted (Ctrl-C)\n")
        sys.exit(130)


def exit_stopped(signum: int | None) -> None:
    """A run stopped by a signal at a step boundary (its last.pt saved, the trainer logged
    the one line saying so) ends the process. The signal first goes on to the handler the
    trainer had replaced (not SIGINT's: Python's raises KeyboardInterrupt): submitit's
    requeues the job and exits itself. Then exit with status 1 and no result under submitit,
    so that the launcher waits for the job SLURM requeues (trainer.resume=auto); else with
    128 + the signal's number, as a shell reports a process that a signal ended (Ctrl-C:
    130), which also ends a local sweep instead of starting its next job."""
    handler = signal.getsignal(signum) if signum is not None else None
    if signum != signal.SIGINT and callable(handler):
        handler(signum, None)
    if os.environ.get("SUBMITIT_FOLDER"):
        log.warning("exiting without a result; the requeued job resumes from last.pt")
        sys.exit(1)
    sys.exit(128 + (signum or 15))

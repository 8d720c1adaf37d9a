"""What the command-line entry points share: a ``UserError`` becomes one line, not a traceback.

``python -m segtrain``, ``segtrain.evaluate``, ``segtrain.predict`` and ``segtrain.export`` run
their body in ``user_errors()``. The only segtrain module besides the entry points themselves
that knows Hydra's run modes; ``segtrain.errors`` stays free of Hydra.
"""

from __future__ import annotations

import logging
import os
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

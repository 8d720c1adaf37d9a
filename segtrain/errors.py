"""Errors a user can fix: bad data, a bad config value, a missing or mismatched checkpoint.

The Hydra entry points (``python -m segtrain``, ``segtrain.evaluate``, ``segtrain.predict``)
run their body in ``user_errors()``: a ``UserError`` prints ``error: <message>`` on stderr
and exits with status 1, without a traceback (``HYDRA_FULL_ERROR=1`` shows it). Anything
else is a bug and keeps its traceback.
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

log = logging.getLogger("segtrain")

# the line DataLoader puts before the formatted traceback of an error in a worker process
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class UserError(CompactHydraException, RuntimeError):
    """Base class: the message names the file, key or value and what was expected."""


class ConfigError(UserError, ValueError):
    """A config value or combination of values cannot work (e.g. a model/loss mismatch).

    Also a ``ValueError``, so code that checks for a bad value that way keeps working."""


def plain_message(err: BaseException) -> str:
    """The message of ``err``; for an error re-raised from a DataLoader worker, the worker's
    own message instead of the worker's traceback that DataLoader puts in its place."""
    text = str(err)
    if _WORKER_TRACEBACK not in text:
        return text
    prefix = f"{type(err).__name__}: "
    lines = text.split(_WORKER_TRACEBACK, 1)[1].splitlines()
    for i, line in enumerate(lines):
        if line.startswith(prefix) or line.startswith(f"{type(err).__module__}.{prefix}"):
            return "\n".join([line.split(": ", 1)[1], *lines[i + 1:]]).strip()
    return text


def from_worker(err: UserError) -> UserError:
    """``err`` with the worker's message when it came from a DataLoader worker process."""
    message = plain_message(err)
    if message == str(err):
        return err
    clean = type(err).__new__(type(err))
    clean.args = (message,)
    return clean


@contextmanager
def user_errors() -> Iterator[None]:
    """Around the body of a Hydra entry point: a ``UserError`` ends a single run with its
    message on stderr and exit status 1, no traceback. In a sweep it is logged in the job's
    log and re-raised, so Hydra records that job as failed, runs the others, and names the
    failed job's overrides and error at the end (compact: a ``CompactHydraException``).
    ``HYDRA_FULL_ERROR=1`` re-raises it to show the traceback."""
    try:
        yield
    except UserError as err:
        message = plain_message(err)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("%s", message)
            clean = from_worker(err)
            if clean is err:
                raise
            raise clean from None
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        sys.exit(1)

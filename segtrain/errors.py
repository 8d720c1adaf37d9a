"""Errors a user can fix: bad data, a bad config value, a missing or mismatched checkpoint.

segtrain's own exceptions, independent of Hydra: models, losses and datasets raise them
without importing it. The command-line entry points (``python -m segtrain``,
``segtrain.evaluate``, ``segtrain.predict``, ``segtrain.export``) turn a ``UserError`` into
the one-line ``error: <message>`` (``segtrain.cli.user_errors``). Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

# the line DataLoader puts before the formatted traceback of an error in a worker process
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class UserError(RuntimeError):
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

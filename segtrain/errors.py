"""Errors a user can fix: bad data, a bad config value, a missing or mismatched checkpoint.

The entry points print a ``UserError``'s message in one or two lines and exit with status 1,
without a traceback (``HYDRA_FULL_ERROR=1`` shows it). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(RuntimeError):
    """Base class: the message names the file, key or value and what was expected."""


class ConfigError(UserError):
    """A config value or combination of values cannot work (e.g. a model/loss mismatch)."""

"""Atomic checkpoints: written to a temporary file in the same folder, flushed to disk, then
renamed over the target, so a kill during a write leaves the previous file intact."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from segtrain.errors import UserError


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or not a segtrain checkpoint."""


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve(source: str | Path) -> Path:
    """A checkpoint file, or a run folder (then ``checkpoints/last.pt`` inside it)."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} (expected a .pt file or a run folder containing "
            f"checkpoints/last.pt)")
    return path


def load(source: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``save_atomic``, with a clear error when it is not one."""
    path = resolve(source)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - truncated zip, pickle error, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {err}") from err
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a segtrain checkpoint (no 'model' entry)")
    return state

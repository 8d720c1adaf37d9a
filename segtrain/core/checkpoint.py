"""Atomic, safe checkpoints.

Written to a temporary file in the same folder, flushed to disk, then renamed over the
target, so a kill during a write leaves the previous file intact; the temporary files a
``kill -9`` leaves behind are removed by the next write and when a run starts.

A checkpoint holds tensors and plain types only (dicts, lists, numbers, strings) and is read
with ``torch.load(weights_only=True)``: a file whose pickle would build any other object
(and could run code while doing so) is refused before anything in it runs.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from segtrain.errors import UserError

log = logging.getLogger("segtrain")

#: the checkpoint files the trainer writes; their temporaries are ``.<name>.<random>.tmp``
NAMES = ("last.pt", "best.pt")

#: the only globals beyond tensors and plain types that checkpoints of segtrain before safe
#: loading hold: NumPy's RNG state (``np.random.get_state()``, a uint32 key array), pickled
#: by NumPy 2 (``numpy._core``) or NumPy 1 (``numpy.core``); scripts/upgrade_checkpoint.py
#: allows these and nothing else
LEGACY_GLOBALS = ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
                  "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType")

# how torch's weights-only unpickler names what it refused, by the kind of refusal
_REFUSED = (re.compile(r"GLOBAL (\S+) was not an allowed global"),
            re.compile(r"got <class '([^']+)'>"),
            re.compile(r"unrecognized function <?(?:built-in function |function )?([\w.]+)"))


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, unsafe or not a segtrain checkpoint."""


class ScheduleChanged(UserError):
    """A resume whose max_iters, schedule, base rate or batch differ from the checkpoint's."""


def _temporaries(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.*.tmp"))


def remove_stale_temporaries(folder: str | Path, names: tuple[str, ...] = NAMES) -> list[Path]:
    """Delete the temporary files that killed writes of ``names`` left in ``folder``.

    Only the writing process (rank 0 of the run that owns ``folder``) may call this: a
    temporary file of a write in progress looks the same as a stale one.
    """
    removed = []
    for name in names:
        for tmp in _temporaries(Path(folder), name):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        log.info("removed %d stale temporary checkpoint file(s) in %s: %s", len(removed),
                 folder, ", ".join(p.name for p in removed))
    return removed


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # one writer per file: any temporary of this name is left over from a killed write
        remove_stale_temporaries(path.parent, (path.name,))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        # torch's writer reports a full disk as a RuntimeError without an errno
        # ("[enforce fail at inline_container.cc:...] unexpected pos ...")
        if not isinstance(err, OSError) and not (isinstance(err, RuntimeError) and any(
                mark in str(err) for mark in ("inline_container", "PytorchStreamWriter"))):
            raise
        kept = f"the previous {path.name} is kept" if path.is_file() else \
            f"no earlier {path.name} exists"
        reason = f"{err.strerror} ({errno.errorcode.get(err.errno, err.errno)})" \
            if isinstance(err, OSError) and err.strerror else \
            f"torch's writer failed ({str(err).strip().splitlines()[0]}), " \
            f"{_free_space(path.parent)}"
        raise CheckpointError(f"cannot write checkpoint {path}: {reason}; {kept}. Free "
                              f"disk space or make the run folder writable, then resume with "
                              f"trainer.resume={path.parent.parent}") from None
    return path


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.0f} MiB free on its disk"


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
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        foreign = foreign_globals(path) or [refused_global(err)]
        if set(foreign) <= set(LEGACY_GLOBALS):
            advice = (f"segtrain checkpoints never do; this one looks written by a segtrain "
                      f"before safe loading (NumPy RNG states), and scripts/upgrade_checkpoint"
                      f".py converts it without running anything: python scripts/upgrade_"
                      f"checkpoint.py {path}")
        else:
            foreign = [name for name in foreign if name not in LEGACY_GLOBALS]
            advice = ("segtrain never writes such a file and nothing converts it: do not "
                      "load it (scripts/upgrade_checkpoint.py refuses it too)")
        raise CheckpointError(
            f"checkpoint {path} refused: it holds Python objects other than tensors and plain "
            f"types, and loading it could run code (it asks for {', '.join(foreign)}); "
            f"{advice}") from None
    except Exception as err:  # noqa: BLE001 - truncated zip, I/O error, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {err}") from err
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a segtrain checkpoint (no 'model' entry)")
    return state


def foreign_globals(path: Path) -> list[str]:
    """The globals beyond torch's weights-only allowlist that the pickle in ``path`` names
    (read without unpickling anything; empty when it cannot be read that way)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: the unpickler's error says
        return []


def refused_global(err: pickle.UnpicklingError) -> str:
    """The global (module.name) that torch's weights-only unpickler refused in ``err``."""
    for pattern in _REFUSED:
        found = pattern.search(str(err))
        if found:
            return found.group(1)
    return "an object that is not a tensor or a plain type"


def _model_of(state: dict[str, Any]) -> str:
    """The model class a checkpoint was written for, from the config stored in it."""
    try:
        from omegaconf import OmegaConf

        return str(OmegaConf.create(state["config"]).model._target_)
    except Exception:  # noqa: BLE001 - no config, or an unexpected one
        return "an unknown model"


def _listed(keys: list[str], limit: int = 3) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_model_state(model: torch.nn.Module, state: dict[str, Any], source: str | Path) -> None:
    """``model.load_state_dict(state["model"])``, or a CheckpointError saying which keys and
    shapes differ and which model the checkpoint came from."""
    weights, own = state["model"], model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing key(s): {_listed(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}"
                 if unexpected else "",
                 f"{len(shapes)} shape mismatch(es) (checkpoint vs model): {_listed(shapes)}"
                 if shapes else ""]
        raise CheckpointError(
            f"checkpoint {source} holds weights of {_model_of(state)}, which do not fit "
            f"{type(model).__name__}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(weights)


def inference_weights(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the weights that evaluation and prediction use as its ``model``: the
    weight average of a ``trainer.ema`` run's last.pt (whose ``model`` holds the trained
    weights, to resume from), else its own (best.pt holds the average already)."""
    return {**state, "model": state["ema"]["model"]} if "ema" in state else state


def check_schedule(saved: dict[str, Any] | None, current: dict[str, Any], allow_change: bool,
                   source: str | Path) -> bool:
    """Compare the schedule a checkpoint recorded (``saved``: max_iters, lr schedule, base
    rate, images per step) with the run's. True when they differ and ``allow_change``
    (trainer.resume_allow_schedule_change); ``ScheduleChanged`` when they differ and not."""
    if not current or saved is None:
        if current:
            log.warning("checkpoint %s records no schedule (written before segtrain stored "
                        "it): trainer.max_iters and the lr schedule are not checked against "
                        "it", source)
        return False
    changed = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}"
               for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if changed and not allow_change:
        raise ScheduleChanged(
            f"resume from {source} refused: its schedule differs ({'; '.join(changed)}), "
            f"which would bend its learning-rate curve; start a new run, or set "
            f"trainer.resume_allow_schedule_change=true to continue with the new one")
    if changed:
        log.warning("resuming %s with a changed schedule (trainer.resume_allow_schedule_"
                    "change=true): %s", source, "; ".join(changed))
    return bool(changed)

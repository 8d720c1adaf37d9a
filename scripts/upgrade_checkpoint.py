"""Convert a checkpoint of a segtrain version before safe loading to the current format.

    python scripts/upgrade_checkpoint.py outputs/<run>/checkpoints/last.pt [more.pt ...]

Older checkpoints stored the Python and NumPy RNG states as a Python tuple and a NumPy array,
which ``torch.load(weights_only=True)`` refuses. This script reads the file with torch's
restricted (weights-only) unpickler, allowing in addition only the NumPy globals such an RNG
state needs (``segtrain.core.checkpoint.LEGACY_GLOBALS``): it never calls anything else a
pickle names, and refuses any other file with one line naming the global it asked for. It
rewrites the file in place (the old one is kept as ``<name>.old``) with the RNG states as
tensors and plain types.
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from numpy._core import multiarray

from segtrain.core import checkpoint

# each name of checkpoint.LEGACY_GLOBALS with the object it stands for
_OBJECTS = {"numpy._core.multiarray._reconstruct": multiarray._reconstruct,
            "numpy.core.multiarray._reconstruct": multiarray._reconstruct,
            "numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
            "numpy.dtypes.UInt32DType": type(np.dtype(np.uint32))}


def plain_rng(rng: dict) -> dict:
    """The RNG states of an old checkpoint in the format of ``segtrain.core.rng.rng_state``."""
    out = dict(rng)
    python = rng.get("python")
    if isinstance(python, tuple):
        version, internal, gauss = python
        out["python"] = [version, list(internal), gauss]
    numpy = rng.get("numpy")
    if isinstance(numpy, tuple):
        kind, keys, pos, has_gauss, cached = numpy
        out["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    return out


def load_legacy(path: Path) -> dict:
    """The checkpoint at ``path`` through the weights-only unpickler plus LEGACY_GLOBALS."""
    allowed = [(_OBJECTS[name], name) for name in checkpoint.LEGACY_GLOBALS]
    foreign = [name for name in checkpoint.foreign_globals(path)
               if name not in checkpoint.LEGACY_GLOBALS]
    try:
        if foreign:  # named before unpickling; the restricted unpickler refuses them anyway
            raise pickle.UnpicklingError(f"GLOBAL {foreign[0]} was not an allowed global")
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise checkpoint.CheckpointError(
            f"{path} refused, nothing in it was run: it asks for "
            f"{checkpoint.refused_global(err)}, which is not one of the NumPy RNG-state "
            f"globals older segtrain checkpoints hold ({', '.join(checkpoint.LEGACY_GLOBALS)})"
        ) from None
    except Exception as err:  # noqa: BLE001 - truncated zip, I/O error, ...
        raise checkpoint.CheckpointError(f"{path} is corrupt or unreadable: {err}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise checkpoint.CheckpointError(f"{path} is not a segtrain checkpoint (no 'model' "
                                         f"entry)")
    return state


def upgrade(path: Path) -> None:
    state = load_legacy(path)
    if "rng" in state:
        state["rng"] = plain_rng(state["rng"])
    shutil.copy2(path, path.with_name(path.name + ".old"))
    checkpoint.save_atomic(state, path)
    checkpoint.load(path)  # loads safely now, or says what is still not plain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    for path in parser.parse_args(argv).files:
        try:
            upgrade(path)
        except checkpoint.CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"{path}: upgraded (the original is {path.name}.old)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert a checkpoint of a segtrain version before safe loading to the current format.

    python scripts/upgrade_checkpoint.py outputs/<run>/checkpoints/last.pt [more.pt ...]

Older checkpoints stored the Python and NumPy RNG states as Python tuples and NumPy arrays,
which ``torch.load(weights_only=True)`` refuses. This script opens the file with
``weights_only=False``, which runs whatever the file's pickle asks for: use it only on files
you wrote yourself or trust. It rewrites the file in place (the old one is kept as
``<name>.old``) with the RNG states as tensors and plain types.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from segtrain.core import checkpoint


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


def upgrade(path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)  # trusted by the user
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

"""Random number generators: every state saved in a checkpoint and restored, and the seeds
of the per-rank streams (initialisation, dropout), so a resumed run draws what an
uninterrupted one draws."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("segtrain")


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain types (checkpoints load with weights_only)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def stream_seed(*keys: int) -> int:
    """A seed for the stream named by ``keys`` (seed, rank, ...): a NumPy SeedSequence, so no
    two key tuples share a stream (``seed + rank`` would: seed 1 rank 0 = seed 0 rank 1)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def load_rank_state(states: list[dict[str, Any]] | dict[str, Any], rank: int, seed: int,
                    iteration: int, source: str | Path = "") -> None:
    """Set this rank's RNG states from a checkpoint's list, indexed by rank (one dict: a
    checkpoint of one process, or of a segtrain before per-rank states)."""
    states = [states] if isinstance(states, dict) else list(states)
    if rank < len(states):
        set_rng_state(states[rank])
        return
    # resumed on more ranks than saved: a fresh stream, still a function of seed, rank and
    # iteration (dropout differs from an uninterrupted run on this many ranks)
    log.warning("%s holds the RNG states of %d rank(s); rank %d starts a new stream from "
                "(seed, rank, iteration)", source or "the checkpoint", len(states), rank)
    seed_everything(stream_seed(seed, rank, iteration))

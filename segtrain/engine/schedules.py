"""Learning-rate schedules as multiplicative factors of the base rate, one step per iteration.

- ``poly``: ``(1 - it / max_iters) ** power`` (DeepLab v2 Sec. 4.1, power 0.9).
- ``step``: ``gamma ** (number of milestones <= it)`` (DeepLab v1 / Caffe "multistep").
Both take an optional linear warmup from ``warmup_ratio`` to 1 over ``warmup_iters``,
multiplied onto the schedule (Goyal et al. 2017, Sec. 2.2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def _warmup(it: int, warmup_iters: int, warmup_ratio: float) -> float:
    if warmup_iters <= 0 or it >= warmup_iters:
        return 1.0
    return warmup_ratio + (1.0 - warmup_ratio) * it / warmup_iters


def poly(max_iters: int, power: float, warmup_iters: int = 0,
         warmup_ratio: float = 0.1) -> Callable[[int], float]:
    """Factor ``(1 - it/max_iters)^power`` (DeepLab v2, "poly" policy)."""
    if max_iters <= 0:
        raise ValueError(f"max_iters must be positive, got {max_iters}")

    def factor(it: int) -> float:
        base = max(0.0, 1.0 - it / max_iters) ** power
        return base * _warmup(it, warmup_iters, warmup_ratio)

    return factor


def step(max_iters: int, milestones: Sequence[int], gamma: float, warmup_iters: int = 0,
         warmup_ratio: float = 0.1) -> Callable[[int], float]:
    """Factor ``gamma^k`` with ``k`` the number of milestones already reached.

    Milestones given as fractions (0 < m < 1) are read as fractions of ``max_iters``.
    """
    marks = sorted(int(round(m * max_iters)) if 0 < m < 1 else int(m) for m in milestones)

    def factor(it: int) -> float:
        k = sum(1 for m in marks if it >= m)
        return gamma**k * _warmup(it, warmup_iters, warmup_ratio)

    return factor


def constant(max_iters: int, warmup_iters: int = 0,
             warmup_ratio: float = 0.1) -> Callable[[int], float]:
    """Factor 1 (after the optional warmup)."""

    def factor(it: int) -> float:
        return _warmup(it, warmup_iters, warmup_ratio)

    return factor


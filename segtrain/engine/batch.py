"""The batch a step trains on: ``trainer.global_batch_size`` images per optimizer step,
split over the ranks and the accumulated micro-batches (Goyal et al. 2017, Sec. 2.2: the
minibatch size is the total over all workers), so that one experiment trains with its
paper's batch on 1, 4 or 8 GPUs.

One convention: a run states the images per step (``trainer.global_batch_size``) and each
rank's micro-batch is derived from it. ``trainer.batch_size`` (the micro-batch of one rank)
is for a run that sets ``trainer.global_batch_size=null``; a config that sets both is refused,
so that no per-rank value silently loses to (or changes) a paper's batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from segtrain.errors import ConfigError


@dataclass(frozen=True)
class Batch:
    """What one optimizer step trains on: ``per_rank`` images in each of ``iter_size``
    accumulated micro-batches on each of ``world_size`` ranks."""

    per_rank: int
    iter_size: int
    world_size: int

    @property
    def images_per_step(self) -> int:
        return self.per_rank * self.iter_size * self.world_size


def per_rank_batch(global_batch_size: int, world_size: int, iter_size: int) -> int:
    """Micro-batch of one rank: ``global_batch_size / (world_size x iter_size)``."""
    parts = world_size * iter_size
    if global_batch_size < 1 or global_batch_size % parts:
        raise ConfigError(
            f"trainer.global_batch_size={global_batch_size} does not divide into {world_size} "
            f"rank(s) x trainer.iter_size={iter_size}; choose a multiple of {parts}, or "
            f"another iter_size or number of GPUs")
    return global_batch_size // parts


def resolve_batch(batch_size: int | None, global_batch_size: int | None, iter_size: int,
                  world_size: int) -> Batch:
    """The one resolution of ``trainer.batch_size`` / ``trainer.global_batch_size`` /
    ``trainer.iter_size`` on ``world_size`` ranks (training, ``segtrain.protocol`` and the
    tests all call it)."""
    if batch_size is not None and global_batch_size is not None:
        raise ConfigError(
            f"trainer.batch_size={batch_size} and trainer.global_batch_size="
            f"{global_batch_size} are both set; state the images per optimizer step as "
            f"trainer.global_batch_size (each rank's batch is derived from it), or set "
            f"trainer.global_batch_size=null to give the per-rank trainer.batch_size")
    if global_batch_size is not None:
        return Batch(per_rank_batch(int(global_batch_size), world_size, iter_size), iter_size,
                     world_size)
    if batch_size is None:
        raise ConfigError("neither trainer.global_batch_size (images per optimizer step) nor "
                          "trainer.batch_size (per rank) is set; set one of them")
    return Batch(int(batch_size), iter_size, world_size)

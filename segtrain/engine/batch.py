"""The batch a step trains on: ``trainer.global_batch_size`` images per optimizer step,
split over the ranks and the accumulated micro-batches (Goyal et al. 2017, Sec. 2.2: the
minibatch size is the total over all workers), so that one experiment trains with its
paper's batch on 1, 4 or 8 GPUs.
"""

from __future__ import annotations

from segtrain.errors import ConfigError


def per_rank_batch(global_batch_size: int, world_size: int, iter_size: int) -> int:
    """Micro-batch of one rank: ``global_batch_size / (world_size x iter_size)``."""
    parts = world_size * iter_size
    if global_batch_size < 1 or global_batch_size % parts:
        raise ConfigError(
            f"trainer.global_batch_size={global_batch_size} does not divide into {world_size} "
            f"rank(s) x trainer.iter_size={iter_size}; choose a multiple of {parts}, or "
            f"another iter_size or number of GPUs")
    return global_batch_size // parts

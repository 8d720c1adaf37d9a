"""Data loading with a reproducible, resumable order.

Training is iteration based. The sample order is one endless stream: epoch ``e`` is a
permutation drawn from ``seed + e``, and iteration ``i`` takes the global batch
``stream[i*B : (i+1)*B]``; rank ``r`` of ``W`` takes every W-th element of it. Each sample's
augmentation is seeded from its stream position, so a run resumed at iteration ``k`` sees
exactly the batches and augmentations the uninterrupted run saw, whatever the number of
workers. Each transform of a sample draws from its own stream
(``transforms.seed_independently``), so flip, scale and crop are independent of each other.
With class-uniform sampling (``dataset.class_uniform``) epoch ``e`` is the list of
``segtrain.data.class_uniform.ClassUniformPlan.epoch(seed, e)`` instead, whose centred
entries carry the centroid their crop covers; the same rules hold.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from segtrain.data.class_uniform import Centroid, ClassUniformPlan
from segtrain.data.transforms import seed_independently


class IterationSampler(Sampler[tuple[int, int]]):
    """Yields ``(dataset index, stream position)`` for iterations ``start_iter..``, endlessly.

    Args:
        length: dataset size.
        batch_size: per-rank batch size.
        seed: base seed of the permutations.
        start_iter: first iteration to produce (resume).
        shuffle: permute each epoch (else sequential order).
        rank, world_size: distributed position.
    """

    def __init__(self, length: int, batch_size: int, seed: int, start_iter: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if length <= 0:
            raise ValueError("the training split is empty")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.start_iter, self.shuffle = start_iter, shuffle
        self.rank, self.world_size = rank, world_size

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.length)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.length, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        global_batch = self.batch_size * self.world_size
        pos = self.start_iter * global_batch + self.rank
        epoch, order = -1, None
        while True:
            e = pos // self.length
            if e != epoch:
                epoch, order = e, self._epoch_order(e)
            yield self._key(order[pos % self.length], pos)
            pos += self.world_size

    def _key(self, entry: Any, pos: int) -> tuple:
        return int(entry), pos

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2**62


class ClassUniformSampler(IterationSampler):
    """``IterationSampler`` over the epochs of a class-uniform plan: yields ``(dataset
    index, stream position, centroid or None)``."""

    def __init__(self, plan: ClassUniformPlan, batch_size: int, seed: int,
                 start_iter: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(plan.length, batch_size, seed, start_iter, True, rank, world_size)
        self.plan = plan

    def _epoch_order(self, epoch: int) -> list[tuple[int, Centroid | None]]:
        return self.plan.epoch(self.seed, epoch)

    def _key(self, entry: tuple[int, Centroid | None], pos: int) -> tuple:
        index, centroid = entry
        return index, pos, centroid


class SeededAugmentation(Dataset):
    """Wraps a dataset so that item ``(index, position)`` seeds its augmentation by position."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple) -> dict[str, Any]:
        """``key``: ``(index, position)``, or ``(index, position, centroid)`` from a
        class-uniform sampler (a centroid goes to the dataset's ``item``)."""
        index, position, *centroid = key
        transforms = getattr(self.dataset, "transforms", None)
        if transforms is not None:
            seed_independently(transforms, self.seed, position)
        if centroid and centroid[0] is not None:
            return self.dataset.item(index, centroid[0])
        return self.dataset[index]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images, masks (and the images as read, ``rgb``, and the source rows, ``rows``,
    where the items have them); keep ``meta`` as a list."""
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "meta": [it["meta"] for it in items],
    }
    if all("rgb" in it for it in items):
        batch["rgb"] = torch.stack([it["rgb"] for it in items])
    if all("rows" in it for it in items):
        batch["rows"] = torch.stack([it["rows"] for it in items])
    return batch


def ignore_ctrl_c(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn
    """A loader worker ignores SIGINT: a terminal's Ctrl-C reaches the whole process group,
    and the training process stops at a step boundary itself (a worker that died of it
    would end the run with 'DataLoader worker exited unexpectedly')."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int,
                 start_iter: int = 0, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False,
                 class_uniform: ClassUniformPlan | None = None) -> DataLoader:
    """Endless, resumable training loader (see module docstring); ``class_uniform``: the
    plan of ``dataset.class_uniform`` (None: plain random crops)."""
    if class_uniform is None:
        sampler = IterationSampler(len(dataset), batch_size, seed, start_iter, True, rank,
                                   world_size)
    else:
        sampler = ClassUniformSampler(class_uniform, batch_size, seed, start_iter, rank,
                                      world_size)
    return DataLoader(SeededAugmentation(dataset, seed), batch_size=batch_size,
                      sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, drop_last=True, worker_init_fn=ignore_ctrl_c,
                      # a private generator: creating the iterator must not draw from the
                      # global RNG, or a resumed run's dropout would differ
                      generator=torch.Generator().manual_seed(seed))


def eval_loader(dataset: Dataset, num_workers: int, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """Batch size 1 (full images of different sizes), each rank a strided share."""
    indices = list(range(rank, len(dataset), world_size))
    subset = torch.utils.data.Subset(dataset, indices)
    return DataLoader(subset, batch_size=1, shuffle=False, num_workers=num_workers,
                      collate_fn=collate, worker_init_fn=ignore_ctrl_c,
                      generator=torch.Generator().manual_seed(0))

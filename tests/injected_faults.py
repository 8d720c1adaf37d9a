"""Faults the distributed tests inject into real runs through the config (``_target_``), and
a probe a worker process runs to tell how it was started."""

from __future__ import annotations

import torch

from segtrain.losses.ce import CrossEntropyLoss

#: set to True by a test in its own process; a spawned process imports this module afresh
PARENT_ONLY = False


def parent_only() -> bool:
    """True in a process forked from the test process after it set PARENT_ONLY."""
    return PARENT_ONLY


class NaNOnOneRank(CrossEntropyLoss):
    """The cross-entropy, times NaN at the ``nan_step``-th call on rank ``nan_rank`` only:
    ``loss._target_=tests.injected_faults.NaNOnOneRank +loss.nan_rank=1 +loss.nan_step=5``."""

    def __init__(self, *args, nan_rank: int, nan_step: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_rank, self.nan_step, self.calls = nan_rank, nan_step, 0

    def forward(self, outputs, batch):
        terms = super().forward(outputs, batch)
        self.calls += 1
        if self.calls == self.nan_step and torch.distributed.get_rank() == self.nan_rank:
            terms = {**terms, "total": terms["total"] * float("nan")}
        return terms

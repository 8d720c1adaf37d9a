"""The checkpoint files of a run folder and the disk they take.

``checkpoints/last.pt`` (the full training state: weights, optimizer state, the weights'
average with ``trainer.ema.decay``, RNG, schedule) and ``best.pt`` (the scored weights) are
always kept; ``trainer.keep_checkpoints=N`` also keeps the N newest periodic copies of last.pt,
``iter_<iteration>.pt`` (a hard link to last.pt where the file system has them, else a copy).
``disk_plan`` states before the first step what these files take at most and refuses a run
whose file system has less free space than that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segtrain.core.checkpoint import NAMES
from segtrain.errors import UserError

#: the periodic copies of last.pt (``trainer.keep_checkpoints``), as a glob and a name
PERIODIC = "iter_*.pt"
#: the checkpoint files this module manages, for ``core.checkpoint.remove_stale_temporaries``
ALL_NAMES = (*NAMES, PERIODIC)


def periodic_name(iteration: int) -> str:
    return f"iter_{iteration:07d}.pt"


def keep_periodic(folder: Path, last: Path, iteration: int, keep: int) -> None:
    """Keep ``last`` (just written) as the periodic checkpoint of ``iteration`` and delete
    the periodic checkpoints older than the ``keep`` newest. Nothing when ``keep`` is 0."""
    if keep <= 0:
        return
    target = folder / periodic_name(iteration)
    if not target.exists():
        try:
            os.link(last, target)  # no second copy of the bytes while last.pt is this one
        except OSError:  # no hard links here (some network and FAT file systems)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            try:
                shutil.copyfile(last, tmp)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    for old in sorted(folder.glob(PERIODIC))[:-keep]:
        old.unlink(missing_ok=True)


def tensor_bytes(tree: Any) -> tuple[int, int]:
    """(bytes, number) of the tensors in a nest of dicts and lists."""
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size(), 1
    items = tree.values() if isinstance(tree, dict) else \
        tree if isinstance(tree, (list, tuple)) else ()
    sizes = [tensor_bytes(item) for item in items]
    return sum(s[0] for s in sizes), sum(s[1] for s in sizes)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes, number) of the tensors in ``optimizer``'s state once every parameter has its
    own (after the first step): read from the state where it exists, else measured by one
    step of the same optimizer class and group options on a two-element proxy parameter
    (a state tensor of two elements grows with the parameter's size, a scalar does not)."""
    total, count = 0, 0
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        if all(p in optimizer.state for p in params):
            sizes = [tensor_bytes(optimizer.state[p]) for p in params]
            total += sum(s[0] for s in sizes)
            count += sum(s[1] for s in sizes)
            continue
        proxy = torch.zeros(2, dtype=params[0].dtype, device=params[0].device,
                            requires_grad=True)
        proxy.grad = torch.zeros_like(proxy)
        options = {k: v for k, v in group.items() if k != "params"}
        try:
            probe = type(optimizer)([{**options, "params": [proxy]}])
            probe.step()
            state = [v for v in probe.state[proxy].values() if torch.is_tensor(v)]
        except Exception:  # noqa: BLE001 - an optimizer whose step needs more (LBFGS)
            state = [proxy.detach()] * 2  # as Adam's two moments
        per_element = sum(t.element_size() for t in state if t.numel() == 2)
        fixed = sum(t.numel() * t.element_size() for t in state if t.numel() != 2)
        total += sum(per_element * p.numel() + fixed for p in params)
        count += len(state) * len(params)
    return total, count


#: what ``torch.save`` adds to the tensors' bytes: per tensor a zip record (header, name,
#: alignment to 64 bytes), per file the pickled structure and the config text
PER_TENSOR_OVERHEAD, PER_FILE_OVERHEAD = 256, 1 << 20


@dataclass
class DiskPlan:
    """The largest size of each checkpoint file of a run and the free space it has."""

    last: int  # last.pt, and each periodic copy
    best: int  # best.pt
    keep: int  # trainer.keep_checkpoints
    present: int  # bytes of these files the run folder already holds (a resumed run)
    free: int  # on the run folder's file system

    @property
    def total(self) -> int:
        """What the files take at most: last.pt, best.pt, the periodic copies and one more
        last.pt while it is rewritten (an atomic write holds the old and the new file)."""
        return self.last * (self.keep + 2) + self.best

    @property
    def needed(self) -> int:
        """What the run still has to find free: the total less the files it replaces."""
        return max(self.total - self.present, self.last)

    def text(self, run_dir: Path) -> str:
        periodic = f" + {self.keep} periodic cop{'y' if self.keep == 1 else 'ies'} " \
                   f"(trainer.keep_checkpoints)" if self.keep else ""
        return (f"checkpoints: last.pt {mb(self.last)}, best.pt {mb(self.best)}{periodic}: "
                f"up to {mb(self.total)} in {run_dir / 'checkpoints'} (one more last.pt while "
                f"it is rewritten), {mb(self.free)} free there")


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"


def disk_plan(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
              ema: nn.Module | None, keep: int) -> DiskPlan:
    """The sizes of a run's checkpoint files, from the bytes of the model's parameters and
    buffers, the optimizer's state and the weights' average ``ema`` (None: off)."""
    model_bytes, model_tensors = tensor_bytes(model.state_dict())
    opt_bytes, opt_tensors = optimizer_state_bytes(optimizer)
    ema_bytes, ema_tensors = tensor_bytes(ema.state_dict()) if ema is not None else (0, 0)
    last = model_bytes + opt_bytes + ema_bytes + PER_FILE_OVERHEAD + PER_TENSOR_OVERHEAD * (
        model_tensors + opt_tensors + ema_tensors)
    scored = (ema_bytes, ema_tensors) if ema is not None else (model_bytes, model_tensors)
    best = scored[0] + PER_FILE_OVERHEAD + PER_TENSOR_OVERHEAD * scored[1]
    folder = Path(run_dir) / "checkpoints"
    present = sum(p.stat().st_size for name in ALL_NAMES for p in folder.glob(name)
                  if p.is_file())
    probe = folder if folder.is_dir() else Path(run_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return DiskPlan(last, best, keep, present, shutil.disk_usage(probe).free)


class NotEnoughDisk(UserError):
    """The run folder's file system cannot hold the run's checkpoints."""


def check_disk(plan: DiskPlan, run_dir: Path) -> None:
    """Refuse a start that could not write its checkpoints."""
    if plan.free < plan.needed:
        raise NotEnoughDisk(
            f"not enough disk for the checkpoints of this run: {mb(plan.needed)} needed in "
            f"{run_dir / 'checkpoints'} (last.pt {mb(plan.last)}, best.pt {mb(plan.best)}, "
            f"{plan.keep} periodic (trainer.keep_checkpoints), one more last.pt while it is "
            f"rewritten), {mb(plan.free)} free; free disk space, choose another run folder "
            f"(hydra.run.dir) or lower trainer.keep_checkpoints")

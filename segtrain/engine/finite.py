"""Non-finite losses and weights, found without a host sync per step and agreed by every
rank at the loop's check points (log interval, evaluation, checkpoint): one all-reduce of
two integers, so every rank raises the same error at the same iteration."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from segtrain.core import checkpoint
from segtrain.core.distributed import all_reduce_min
from segtrain.errors import UserError


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the last good state was checkpointed."""


# the codes of ``agree``: a non-finite loss at step i is i (the earliest wins)
FINITE, WEIGHTS_NOT_FINITE = 2**62, 2**62 - 1


def weights_finite_flag(model: nn.Module) -> torch.Tensor:
    """One fused check of every floating tensor of ``model``'s state, as a device bool: the
    max-abs (infinity) norm of a tensor is NaN or inf exactly when one of its values is, and
    a multi-tensor kernel computes all of them at once (an L2 norm would overflow)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point() and t.numel()]
    flags = []
    for dtype in {t.dtype for t in tensors}:  # _foreach_norm wants one dtype per call
        norms = torch._foreach_norm([t for t in tensors if t.dtype == dtype], math.inf)
        flags.append(torch.isfinite(torch.stack(norms)).all())
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


def agree(bad_iter: torch.Tensor, weights_flag: torch.Tensor | None,
          stop: bool) -> tuple[int, bool]:
    """What every rank decides together: the earliest step whose loss was not finite on any
    rank (``bad_iter``: this rank's, -1 for none), else WEIGHTS_NOT_FINITE when
    ``weights_flag`` is false on any rank, else FINITE; and whether any rank was asked to
    ``stop``. One all-reduce (min) under DDP, one host sync."""
    bad = torch.where(bad_iter >= 0, bad_iter, FINITE)
    if weights_flag is not None:
        flag = weights_flag.to(bad.device)
        bad = torch.where((bad == FINITE) & ~flag, WEIGHTS_NOT_FINITE, bad)
    stop_code = torch.full((), -int(stop), dtype=bad.dtype, device=bad.device)
    code, stop_code = all_reduce_min(torch.stack([bad, stop_code])).tolist()
    return code, stop_code < 0


def kept_checkpoint(last: Path) -> str:
    """What is kept when NaN/inf already reached the weights (or the BatchNorm statistics):
    ``last`` (last.pt), which was checked finite when it was written, if there is one."""
    if last.is_file():
        return (f"The weights are no longer finite; {last} from iteration "
                f"{checkpoint.load(last)['iteration']} is kept.")
    return "The weights are no longer finite and no checkpoint was written yet."


def non_finite_error(what: str, at: int, terms: dict[str, float],
                     kept: str) -> NonFiniteLossError:
    values = {k: float(v) for k, v in terms.items()}
    return NonFiniteLossError(
        f"non-finite {what} at iteration {at} (loss terms {values}). {kept} Try a lower "
        f"optim.lr, trainer.clip_grad_norm, or trainer.precision=fp32.")

"""Numeric precision of training and evaluation: ``fp32 | bf16 | fp16 | auto`` and the
autocast dtype each one means (GradScaler is the trainer's business: fp16 only)."""

from __future__ import annotations

import torch

#: the values of ``trainer.precision`` and ``eval.precision`` (the config schema checks them)
PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA that supports it (else fp16), fp32 on CPU."""
    assert precision in PRECISIONS, precision
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None for fp32 (no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

"""Numeric precision of training and evaluation: ``fp32 | bf16 | fp16 | auto`` and the
autocast dtype each one means (GradScaler is the trainer's business: fp16 only)."""

from __future__ import annotations

import torch

from segtrain.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def resolve_precision(precision: str, device: torch.device,
                      key: str = "trainer.precision") -> str:
    """``auto``: bf16 on CUDA that supports it (else fp16), fp32 on CPU. ``key`` names the
    config key in the error (trainer.precision, eval.precision)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None for fp32 (no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

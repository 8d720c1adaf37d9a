"""Loading ImageNet checkpoints from a local path or a URL cached under TORCH_HOME."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn


def _cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_checkpoint(source: str) -> Path:
    """Return a local file for ``source`` (a path or an http(s) URL), downloading if needed.

    Offline, a URL that is not cached raises an error saying where to put the file.
    """
    parsed = urlparse(str(source))
    if parsed.scheme in ("http", "https"):
        target = _cache_dir() / os.path.basename(parsed.path)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(str(source), str(target), progress=True)
        except Exception as err:  # noqa: BLE001 - any network failure gets the same advice
            raise RuntimeError(
                f"could not download pretrained weights from {source} ({err}). "
                f"If this machine is offline, download the file elsewhere and put it at "
                f"{target} (TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}), "
                f"or pass a local path: model.pretrained=/path/to/file.pth"
            ) from err
        return target
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint not found: {path}. Pass an existing file or a URL "
            f"(model.pretrained=...), or model.pretrained=null to train from scratch."
        )
    return path


def load_checkpoint_state(source: str) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``source``, unwrapping ``{"state_dict": ...}``/``{"model": ...}``."""
    path = resolve_checkpoint(source)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(f"cannot read pretrained checkpoint {path}: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def widen_input_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of a stem ``conv`` taking ``in_channels`` (e.g. RGB-D): the RGB filters are kept
    and every extra channel starts as their mean, so pretrained weights stay useful."""
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=False)
    with torch.no_grad():
        keep = min(3, in_channels)
        new.weight[:, :keep] = conv.weight[:, :keep]
        if in_channels > 3:
            new.weight[:, 3:] = conv.weight.mean(dim=1, keepdim=True)
    return new


def load_pretrained(module: nn.Module, source: str | None,
                    convert: Callable[[dict], dict] | None = None,
                    optional: tuple[str, ...] = ()) -> nn.Module:
    """Load ``source`` into ``module`` with strict key matching (torchvision's format).

    ``convert`` renames another layout's keys first; keys of ``module`` starting with one
    of the ``optional`` prefixes may be missing from the checkpoint (they keep their
    initialisation).
    """
    if source:
        state = load_checkpoint_state(source)
        if convert is not None:
            state = convert(state)
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(optional)]
        if missing or unexpected:
            raise RuntimeError(
                f"pretrained checkpoint {source} does not match {type(module).__name__}: "
                f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
    return module

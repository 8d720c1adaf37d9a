"""Metrics files: strict JSON (an undefined IoU, NaN, becomes null), written atomically (a
temporary file renamed over the target, so a reader never sees half a file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """NaN (an undefined IoU) becomes null, so metrics files are strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(data: dict[str, Any], path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically, NaN as null."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2))
    tmp.replace(path)

"""Writing files so that an interrupted run never leaves a truncated one behind."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["save_atomically"]


def save_atomically(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``.

    The temporary name carries the process id, so concurrent writers (DDP ranks) do not collide.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)
    return path

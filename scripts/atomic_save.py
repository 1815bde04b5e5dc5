"""Writing files so that an interrupted run never leaves a truncated one behind."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["write_atomically", "save_atomically"]


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Runs ``write(temporary)`` on a temporary file beside ``path``, then renames it over ``path``.

    The temporary name is hidden, keeps ``path``'s suffix (writers that infer the format from it still
    work) and carries the process id, so concurrent writers (DDP ranks) do not collide.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(temporary)
    except BaseException:  # a failed write (disk full, interrupt) leaves neither a partial file nor the target touched
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)
    return path


def save_atomically(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """``torch.save`` through ``write_atomically``."""
    return write_atomically(path, lambda temporary: torch.save(state, temporary))

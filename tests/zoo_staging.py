"""A copy of this bundle as a fresh clone has it, plus ``models/model.pt``, for the packaging and zoo tests.

A fresh clone has no ``models/model.pt`` (``make model`` trains it in minutes); the tests give the copy the
initialised network's state dict instead, as the model zoo's CI does before its checks (``_produce_fake_weights``
in ``ci/verify_bundle.py``): the checks are about the archive and the configs, not about the weights' quality.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from conftest import REPO_ROOT

__all__ = ["staged_bundle"]

_TRACKED_TOP_LEVEL = ("LICENSE", "large_files.yml", "configs", "docs", "scripts", "models/README.md")


def staged_bundle(target: Path) -> Path:
    """Copies the bundle's files (no caches, data, runs or weights) to ``target`` and writes ``models/model.pt``.

    Returns:
        ``target``.
    """
    for name in _TRACKED_TOP_LEVEL:
        source, destination = REPO_ROOT / name, target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__", "*.pt", "*.pth"))
        else:
            shutil.copy(source, destination)
    parser = ConfigParser()
    parser.read_config(str(target / "configs" / "inference.json"))
    torch.save(parser.get_parsed_content("network_def").state_dict(), target / "models" / "model.pt")
    return target

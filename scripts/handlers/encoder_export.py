"""Exports the pretrained encoder alone, with the keys of the official LVM-Med release."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from scripts.atomic_save import save_atomically
from scripts.model_settings import write_settings

__all__ = ["EncoderExport"]

logger = logging.getLogger(__name__)


class EncoderExport:
    """Writes ``encoder.state_dict()`` to ``path`` at each epoch end and when training completes.

    A ``ResNet50Encoder`` gives torchvision's keys without ``fc`` (like ``lvmmed_resnet.torch``), a
    ``SamViTEncoder`` SAM's image-encoder keys (like ``lvmmed_vit.pth``), so downstream configs load the
    file with ``strict=True``. The file is written to a temporary name and renamed, and only by rank 0.

    Args:
        encoder: the encoder module (unwrapped from DDP).
        path: destination, e.g. ``models/encoder_r50.pt``.
        settings: the settings the module is trained with, written beside it (``models/classifier.settings.json``)
            after each save, for the workflows that use it; None writes none.
    """

    def __init__(self, encoder: nn.Module, path: str | Path, settings: Mapping[str, Any] | None = None) -> None:
        self.encoder = encoder
        self.path = Path(path)
        self.settings = settings

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED | Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        save_atomically({key: value.detach().cpu() for key, value in self.encoder.state_dict().items()}, self.path)
        if self.settings is not None:
            write_settings(self.path, self.settings)
        logger.info("encoder exported to %s", self.path)

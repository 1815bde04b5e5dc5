"""Encoder + projector as pretrained by LVM-Med."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LVMMedNetwork"]


class LVMMedNetwork(nn.Module):
    """An encoder followed by average pooling and a projector (LVM-Med, section 3.2.1).

    Args:
        encoder: maps images (N, C, H, W) to ``(feature_map (N, D, R, S), pooled (N, D))``, e.g.
            ``ResNet50Encoder`` or ``SamViTEncoder``; its state dict is what gets exported.
        projector: maps pooled features (N, D) to embeddings (N, F), e.g. ``ProjectionHead(D, 128)``.

    Example::

        network = LVMMedNetwork(ResNet50Encoder(), ProjectionHead(2048, 128))
        feature_map, embeddings = network(torch.randn(4, 3, 224, 224))  # (4, 2048, 7, 7), (4, 128)
    """

    def __init__(self, encoder: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            images: (N, C, H, W) batch of one view.

        Returns:
            the encoder's feature map (N, D, R, S) and the projected embeddings (N, F).
        """
        feature_map, pooled = self.encoder(images)
        return feature_map, self.projector(pooled)

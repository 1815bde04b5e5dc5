"""Projection head mapping pooled encoder features to the embeddings that LVM-Med matches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Sequential):
    """Projector of LVM-Med (Nguyen et al., NeurIPS 2023, section 3.2.1 and appendix A).

    The paper's projector is ``2048 x 128`` for ResNet-50: a single linear map, which is the default
    here (``hidden_features=()``). Hidden layers (Linear, BatchNorm1d, ReLU each) can be added for a
    SimCLR-style MLP head.

    Args:
        in_features: size of the pooled encoder features (2048 for ResNet-50, 256 for SAM's ViT-B neck).
        out_features: embedding size F.
        hidden_features: sizes of optional hidden layers.

    Example::

        projector = ProjectionHead(2048, 128)
        embeddings = projector(torch.randn(8, 2048))  # (8, 128)
    """

    def __init__(self, in_features: int, out_features: int = 128, hidden_features: Sequence[int] = ()) -> None:
        sizes = [in_features, *hidden_features, out_features]
        if min(sizes) < 1:
            raise ValueError(f"ProjectionHead sizes must be positive, got {sizes}.")
        layers: list[nn.Module] = []
        for size_in, size_out in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(size_in, size_out), nn.BatchNorm1d(size_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """
        Args:
            x: pooled features of shape (N, in_features).

        Returns:
            embeddings of shape (N, out_features).
        """
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"ProjectionHead expects (N, {self.in_features}), got {tuple(x.shape)}.")
        return super().forward(x)

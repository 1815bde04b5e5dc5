"""Network and objective as one module, so that a MONAI ``SupervisedTrainer`` (and DDP) drives them.

The GCN of the objective has parameters, so under DistributedDataParallel it must be wrapped together
with the encoder and projector; and MONAI's trainer calls ``network(inputs, *args)`` then
``loss_function(pred, label)``. ``PretrainModel`` returns the objective's value as its prediction
and ``prediction_is_loss`` hands it on, which keeps MONAI's AMP, gradient accumulation and events.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from scripts.networks.ssl_network import LVMMedNetwork
from scripts.objective.geometry import crop_grid
from scripts.objective.lvmmed_loss import LVMMedLoss

__all__ = ["PretrainModel", "prepare_two_view_batch", "prediction_is_loss"]


class PretrainModel(nn.Module):
    """Encoder + projector (``network``) and the graph-matching objective (``objective``).

    Args:
        network: ``LVMMedNetwork`` whose encoder is what pretraining exports.
        objective: ``LVMMedLoss`` (owns the GCN).

    Example::

        model = PretrainModel(LVMMedNetwork(ResNet50Encoder(), ProjectionHead(2048, 128)), LVMMedLoss())
        loss = model(view1, view2, box1, flip1, box2, flip2)
    """

    def __init__(self, network: LVMMedNetwork, objective: LVMMedLoss) -> None:
        super().__init__()
        self.network = network
        self.objective = objective

    def forward(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor,
        box1: torch.Tensor,
        flip1: torch.Tensor,
        box2: torch.Tensor,
        flip2: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            view1: (N, C, H, W) first views; view2: (N, C, H2, W2) second views, image i at row i.
            box1, box2: (N, 4) crop boxes (y0, x0, y1, x1) in normalised original-image coordinates.
            flip1, flip2: (N,) whether each view was flipped horizontally.

        Returns:
            the scalar objective.
        """
        features1, embeddings1 = self.network(view1)
        features2, embeddings2 = self.network(view2)
        grid1 = crop_grid(box1.to(features1.dtype), flip1.bool(), features1.shape[2:])
        grid2 = crop_grid(box2.to(features2.dtype), flip2.bool(), features2.shape[2:])
        return self.objective(embeddings1, embeddings2, features1, features2, grid1, grid2)


def prepare_two_view_batch(
    batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, None, tuple[torch.Tensor, ...], dict]:
    """``prepare_batch`` for MONAI trainers: (view1, no label, (view2, box1, flip1, box2, flip2), {})."""
    missing = [key for key in ("view1", "view2", "box1", "flip1", "box2", "flip2") if key not in batchdata]
    if missing:
        raise ValueError(f"a two-view batch needs keys {missing} (produced by TwoViewAugmentd).")

    def move(key: str) -> torch.Tensor:
        return torch.as_tensor(batchdata[key]).to(device=device, non_blocking=non_blocking, **kwargs)

    return move("view1"), None, tuple(move(key) for key in ("view2", "box1", "flip1", "box2", "flip2")), {}


def prediction_is_loss(prediction: torch.Tensor, label: Any = None) -> torch.Tensor:
    """``loss_function`` for MONAI trainers whose network already returns the objective."""
    return prediction

"""Deterministic preprocessing of the labelled images that the pretraining monitors embed."""

from __future__ import annotations

import torch
from monai.transforms import Compose, Lambdad, NormalizeIntensityd, Resized

from scripts.transforms.two_view import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["monitor_transform", "three_channels"]


def monitor_transform(image_size: int, key: str = "image") -> Compose:
    """Resize a (C, H, W) image in [0, 1] to ``image_size``², make it 3-channel and normalise it like the SSL views.

    Args:
        image_size: side of the output image (the views' size).
        key: the image's key in the data dict.
    """
    return Compose([
        Resized(keys=key, spatial_size=(image_size, image_size), mode="bilinear"),
        Lambdad(keys=key, func=three_channels),
        NormalizeIntensityd(keys=key, subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD, channel_wise=True),
    ])


def three_channels(image: torch.Tensor) -> torch.Tensor:
    """Grey (1, H, W) repeated to (3, H, W); 3-channel images unchanged."""
    return image.repeat(3, 1, 1) if image.shape[0] == 1 else image

"""The segmentation network of a bundle config, chosen by one value (``architecture``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from scripts.networks.transunet import TransUNet
from scripts.networks.unet_r50 import ResNet50UNet

__all__ = ["ARCHITECTURES", "segmentation_network"]

ARCHITECTURES = {"unet_r50": ResNet50UNet, "transunet": TransUNet}


def segmentation_network(
    architecture: str, in_channels: int, out_channels: int, options: Mapping[str, Any] | None = None
) -> nn.Module:
    """A new, randomly initialised segmentation network.

    Args:
        architecture: ``"unet_r50"`` (``ResNet50UNet``, the paper's U-Net with ResNet-50) or ``"transunet"``
            (``TransUNet`` on the SAM ViT-B encoder).
        in_channels: image channels.
        out_channels: classes, background included.
        options: further constructor arguments of the chosen class (e.g. ``{"vit_args": {"depth": 2}}``).

    Example::

        network = segmentation_network("transunet", in_channels=1, out_channels=3)
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}.")
    return ARCHITECTURES[architecture](in_channels=in_channels, out_channels=out_channels, **dict(options or {}))

"""Smaller ResNets (ResNet-10/18/34) with the encoder interface of ``ResNet50Encoder``, for budget-limited studies."""

from __future__ import annotations

import torch
from monai.networks.nets.resnet import ResNetFeatures

__all__ = ["ResNetFeatureEncoder"]

# MONAI model name -> channels of the last feature map
_OUT_CHANNELS = {"resnet10": 512, "resnet18": 512, "resnet34": 512, "resnet50": 2048}


class ResNetFeatureEncoder(ResNetFeatures):
    """A MONAI ResNet (He et al., CVPR 2016) returning its last feature map and the pooled vector, like
    :class:`~scripts.networks.resnet_encoder.ResNet50Encoder`, so it drops into ``configs/pretrain.json`` and
    ``configs/train_cls.json`` as ``encoder``.

    Its state-dict keys are those of MONAI's ``ResNetFeatures`` of the same ``model_name``, which is the encoder
    of ``monai.networks.nets.FlexibleUNet(backbone=model_name)``: an exported encoder loads into that U-Net with
    ``scripts.weights.load_pretrained_encoder`` (``docs/ssl_study.md`` uses ResNet-18 this way). ``resnet50`` here
    is MONAI's layout (shortcut B with biased downsampling), not torchvision's: use ``ResNet50Encoder`` for that.

    Args:
        model_name: ``"resnet10"``, ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        in_channels: channels of the input image.
        output_stride: 32 (the ResNet as published), or 16: without the stem's max-pooling, so that small images
            give feature maps of useful size (64 x 64 -> 4 x 4), e.g. for LVM-Med's local affinity in budget-limited
            studies. The weights are the same either way (max-pooling has none).

    Example::

        encoder = ResNetFeatureEncoder("resnet18")
        feature_map, pooled = encoder(torch.randn(2, 3, 64, 64))  # (2, 512, 2, 2), (2, 512)
    """

    def __init__(self, model_name: str = "resnet18", in_channels: int = 3, output_stride: int = 32) -> None:
        if model_name not in _OUT_CHANNELS:
            raise ValueError(f"model_name must be one of {sorted(_OUT_CHANNELS)}, got {model_name!r}.")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}.")
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride!r}.")
        super().__init__(model_name, pretrained=False, spatial_dims=2, in_channels=in_channels)
        self.no_max_pool = output_stride == 16  # MONAI's ResNet switch: its forward then skips the max-pooling
        self.output_stride = output_stride
        self.model_name = model_name
        self.in_channels = in_channels
        self.out_channels = _OUT_CHANNELS[model_name]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """
        Args:
            x: images of shape (N, in_channels, H, W), H and W at least the output stride.

        Returns:
            the last feature map (N, out_channels, ceil(H/s), ceil(W/s)), s the output stride, and its spatial mean
            (N, out_channels).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResNetFeatureEncoder expects images of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}.")
        if min(x.shape[2:]) < self.output_stride:
            raise ValueError(f"ResNetFeatureEncoder needs H and W of at least {self.output_stride}, got {tuple(x.shape[2:])}.")
        feature_map = super().forward(x)[-1]
        return feature_map, torch.flatten(self.avgpool(feature_map), 1)

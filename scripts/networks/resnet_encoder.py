"""ResNet-50 encoder with torchvision's state-dict layout, built from MONAI's ResNet."""

from __future__ import annotations

import torch
from monai.networks.nets.resnet import ResNet, ResNetBottleneck, get_inplanes

__all__ = ["ResNet50Encoder"]


class ResNet50Encoder(ResNet):
    """ResNet-50 (He et al., CVPR 2016) returning its last feature map and the pooled vector.

    The configuration (7x7 stem with stride 2, max pooling, bottleneck blocks [3, 4, 6, 3], 1x1
    downsampling convolutions without bias) makes the state-dict keys and shapes equal to
    torchvision's ``resnet50`` without ``fc``: ``conv1``, ``bn1``, ``layer1-4.{i}.conv1-3/bn1-3``,
    ``layer{l}.0.downsample.0/1``. ImageNet weights and the official LVM-Med release
    (``lvmmed_resnet.torch``, Nguyen et al., "LVM-Med: Learning Large-Scale Self-Supervised Vision
    Models for Medical Imaging via Second-order Graph Matching", NeurIPS 2023) therefore load with
    ``strict=True`` once ``fc.*`` is removed.

    Args:
        in_channels: channels of the input image (3 for the released weights).

    Example::

        encoder = ResNet50Encoder()
        feature_map, pooled = encoder(torch.randn(2, 3, 224, 224))  # (2, 2048, 7, 7), (2, 2048)
    """

    def __init__(self, in_channels: int = 3) -> None:
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}.")
        super().__init__(
            block=ResNetBottleneck,
            layers=[3, 4, 6, 3],
            block_inplanes=get_inplanes(),
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            feed_forward=False,
            bias_downsample=False,
        )
        self.in_channels = in_channels
        self.out_channels = 2048

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """
        Args:
            x: images of shape (N, in_channels, H, W), H and W at least 32.

        Returns:
            the layer-4 feature map (N, 2048, ceil(H/32), ceil(W/32)) and its spatial mean (N, 2048).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNet50Encoder expects images of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}."
            )
        if min(x.shape[2:]) < 32:
            raise ValueError(f"ResNet50Encoder needs H and W of at least 32, got {tuple(x.shape[2:])}.")
        x = self.act(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x, torch.flatten(self.avgpool(x), 1)

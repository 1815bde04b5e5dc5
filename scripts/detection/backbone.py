"""ResNet-50 + feature pyramid feature extractor for MONAI's RetinaNet, without torchvision."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torch import nn

from scripts.networks.resnet_encoder import ResNet50Encoder

__all__ = ["ResNetFPNBackbone"]

_STAGES = ("layer1", "layer2", "layer3", "layer4")
_STEM = ("conv1", "bn1")


class ResNetFPNBackbone(nn.Module):
    """Feature pyramid (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017) on the stages of
    a ResNet-50, the feature extractor of RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", ICCV
    2017); the ``feature_extractor`` argument of ``monai.apps.detection.networks.retinanet_network.RetinaNet``.

    MONAI's own ``resnet_fpn_feature_extractor`` cannot be used without torchvision: it validates its arguments
    with ``torchvision.models.detection.backbone_utils._validate_trainable_layers`` and collects the stage
    outputs with ``torchvision.models._utils.IntermediateLayerGetter`` (inside ``BackboneWithFPN``). This module
    replaces only those two pieces: it runs the encoder's stem and stages explicitly, stopping after the deepest
    returned stage (as ``IntermediateLayerGetter`` does), and feeds MONAI's ``FeaturePyramidNetwork`` with a
    ``LastLevelMaxPool`` extra level, so the output is the same as MONAI's extractor's.

    The encoder keeps all its keys (``encoder.conv1``, ``encoder.layer1.0.conv1`` ...), so LVM-Med weights are
    loaded into it before it is wrapped. Freezing follows torchvision's detection backbones: the stages outside
    the last ``trainable_layers`` get ``requires_grad=False``, and with ``freeze_batchnorm`` every BatchNorm of the
    encoder keeps its (pretrained) running statistics and affine parameters, staying in eval mode (the role of
    torchvision's ``FrozenBatchNorm2d``), which suits the small batches of detection.

    Args:
        encoder: a ``ResNet50Encoder`` (pretrained weights already loaded).
        returned_layers: stages (1-4) whose outputs enter the pyramid; the pyramid has one more level (max pool).
        out_channels: channels of every pyramid level.
        trainable_layers: how many stages, counted from ``layer4`` down to the stem, are trained (0-5).
        freeze_batchnorm: keep the encoder's BatchNorm layers fixed and in eval mode.

    Example::

        backbone = ResNetFPNBackbone(ResNet50Encoder(), returned_layers=(1, 2))
        levels = backbone(torch.randn(2, 3, 128, 128))  # {"0": (2,256,32,32), "1": (2,256,16,16), "pool": (2,256,8,8)}
    """

    def __init__(
        self,
        encoder: ResNet50Encoder,
        returned_layers: Sequence[int] = (1, 2, 3),
        out_channels: int = 256,
        trainable_layers: int = 3,
        freeze_batchnorm: bool = False,
    ) -> None:
        super().__init__()
        layers = sorted({int(layer) for layer in returned_layers})
        if not layers or layers[0] < 1 or layers[-1] > 4 or len(layers) != len(tuple(returned_layers)):
            raise ValueError(f"returned_layers must be distinct stages among 1-4, got {list(returned_layers)}")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must lie in [0, 5], got {trainable_layers}")
        if out_channels < 1:
            raise ValueError(f"out_channels must be positive, got {out_channels}")
        self.encoder = encoder
        self.returned_layers = layers
        self.out_channels = out_channels
        self.freeze_batchnorm = freeze_batchnorm
        trained = (*reversed(_STAGES), "conv1")[:trainable_layers]
        if trainable_layers == 5:
            trained += ("bn1",)
        for name, parameter in encoder.named_parameters():
            frozen_bn = freeze_batchnorm and isinstance(encoder.get_submodule(name.rsplit(".", 1)[0]), nn.BatchNorm2d)
            if frozen_bn or not name.startswith(trained) or self._unused(name):
                parameter.requires_grad_(False)
        stage_channels = {1: 256, 2: 512, 3: 1024, 4: 2048}  # bottleneck expansion 4 x (64, 128, 256, 512)
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=2,
            in_channels_list=[stage_channels[layer] for layer in layers],
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(2),
        )
        self.train()

    def _unused(self, name: str) -> bool:
        """Whether parameter ``name`` of the encoder belongs to a stage deeper than the deepest returned one."""
        return any(name.startswith(f"layer{stage}.") for stage in range(self.returned_layers[-1] + 1, 5))

    def train(self, mode: bool = True) -> ResNetFPNBackbone:
        super().train(mode)
        if self.freeze_batchnorm:
            for module in self.encoder.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """
        Args:
            images: (N, encoder.in_channels, H, W).

        Returns:
            the pyramid levels, finest first: keys ``"0"``, ``"1"`` ... for the returned stages (strides 4, 8, 16, 32
            for stages 1-4) and ``"pool"`` for the extra level (half the coarsest), each (N, out_channels, h, w).
        """
        if images.ndim != 4 or images.shape[1] != self.encoder.in_channels:
            raise ValueError(f"ResNetFPNBackbone expects images of shape (N, {self.encoder.in_channels}, H, W), "
                             f"got {tuple(images.shape)}.")
        x = self.encoder.maxpool(self.encoder.act(self.encoder.bn1(self.encoder.conv1(images))))
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        for stage in range(1, self.returned_layers[-1] + 1):
            x = getattr(self.encoder, f"layer{stage}")(x)
            if stage in self.returned_layers:
                features[str(self.returned_layers.index(stage))] = x
        return self.fpn(features)

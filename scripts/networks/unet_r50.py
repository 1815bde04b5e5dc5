"""2D U-Net whose encoder is a ResNet-50 with torchvision's state-dict layout, built on MONAI's FlexibleUNet."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import FlexibleUNet

__all__ = ["ResNet50UNet"]


class ResNet50UNet(FlexibleUNet):
    """U-Net (Ronneberger et al., MICCAI 2015) on a ResNet-50 encoder (He et al., CVPR 2016), the network LVM-Med
    fine-tunes for 2D and 3D-as-slices segmentation (Nguyen et al., "LVM-Med: Learning Large-Scale Self-Supervised
    Vision Models for Medical Imaging via Second-order Graph Matching", NeurIPS 2023, appendix B).

    MONAI's ``FlexibleUNet`` with its ``resnet50`` backbone: the encoder (``self.encoder``) has the same keys and
    shapes as torchvision's ``resnet50`` without ``fc`` (``conv1``, ``bn1``, ``layer1-4``), so the LVM-Med export
    ``models/encoder_r50.pt`` and the official ``lvmmed_resnet.torch`` load into it (see
    ``scripts.weights.load_pretrained_encoder``). The decoder upsamples five times with skip
    connections from the stem and layers 1-3 and predicts at the input resolution, which must be a multiple of 32
    in each dimension (the encoder halves it five times).

    Args:
        in_channels: channels of the input image (1 for grey, 3 for colour or the released 3-channel weights).
        out_channels: classes, background included; the output holds one logit map per class.
        decoder_channels: channels of the five decoder stages, from the deepest.
        norm: normalisation of the decoder blocks, as MONAI names it (``"batch"``, ``"instance"``, ...).
        dropout: dropout probability in the decoder.

    Example::

        network = ResNet50UNet(in_channels=1, out_channels=3)
        logits = network(torch.randn(2, 1, 224, 224))  # (2, 3, 224, 224)
    """

    encoder_kind = "resnet50"
    first_conv_key = "conv1.weight"

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.1}),
        dropout: float = 0.0,
    ) -> None:
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels} and {out_channels}.")
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 values (one per decoder stage), got {list(decoder_channels)}.")
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            backbone="resnet50",
            pretrained=False,
            decoder_channels=tuple(decoder_channels),
            spatial_dims=2,
            norm=norm,
            dropout=dropout,
            is_pad=True,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """
        Args:
            inputs: images of shape (N, in_channels, H, W), H and W positive multiples of 32.

        Returns:
            logits of shape (N, out_channels, H, W).
        """
        if inputs.ndim != 4 or inputs.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNet50UNet expects images of shape (N, {self.in_channels}, H, W), got {list(inputs.shape)}."
            )
        if inputs.shape[2] % 32 != 0 or inputs.shape[3] % 32 != 0:
            raise ValueError(f"ResNet50UNet needs H and W to be multiples of 32, got {list(inputs.shape)}.")
        # FlexibleUNet.forward's three steps, written out because TorchScript cannot script super().forward
        return self.segmentation_head(self.decoder(self.encoder(inputs), self.skip_connect))

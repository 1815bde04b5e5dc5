"""TransUNet with the SAM ViT-B image encoder (LVM-Med's ViT backbone) and a convolutional decoder with skips."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, UnetUpBlock
from torch import nn

from scripts.networks.sam_vit import sam_vit

__all__ = ["TransUNet"]


class TransUNet(nn.Module):
    """TransUNet (Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation", 2021)
    on the SAM ViT-B image encoder, as LVM-Med fine-tunes its ViT (Nguyen et al., "LVM-Med: Learning Large-Scale
    Self-Supervised Vision Models for Medical Imaging via Second-order Graph Matching", NeurIPS 2023, appendix B).

    The transformer (``self.encoder``, SAM's key layout, so ``lvmmed_vit.pth`` loads into it) encodes 16x16
    patches into a 256-channel map at 1/16 of the input size. TransUNet takes its high-resolution skips from the
    CNN stem of its hybrid R50-ViT; a plain ViT has no such stem, so a light convolutional branch trained from
    scratch (four MONAI residual blocks at 1, 1/2, 1/4 and 1/8 of the input size) provides them. The cascaded
    upsampler then doubles the resolution four times, each time concatenating the skip of that scale
    (MONAI ``UnetUpBlock``), and a 1x1 convolution gives one logit map per class.

    Args:
        in_channels: channels of the input image (1 for grey, 3 for colour or the released 3-channel weights).
        out_channels: classes, background included.
        vit_img_size: the square image size the ViT's global relative positions were trained for (1024 for
            ``lvmmed_vit.pth`` and SAM); inputs of any multiple of 16 are accepted, positions are interpolated.
        vit_size: SAM encoder size, ``"b"``, ``"l"`` or ``"h"`` (``scripts.networks.sam_vit.SAM_VIT_SIZES``).
        vit_args: other ``scripts.networks.sam_vit.SamViTEncoder`` arguments overriding the size's (e.g. a tiny
            ``embed_dim``/``depth`` for tests, ``use_abs_pos=True`` for SAM's own checkpoint).
        skip_channels: channels of the convolutional skips at scales 1, 1/2, 1/4 and 1/8; the decoder stage
            of each scale has as many channels.
        norm: normalisation of the convolutional blocks, as MONAI names it.

    Example::

        network = TransUNet(in_channels=1, out_channels=3)
        logits = network(torch.randn(2, 1, 224, 224))  # (2, 3, 224, 224)
    """

    encoder_kind = "sam_vit"
    first_conv_key = "patch_embed.proj.weight"

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        vit_img_size: int = 1024,
        vit_size: str = "b",
        vit_args: Mapping[str, Any] | None = None,
        skip_channels: Sequence[int] = (16, 32, 64, 128),
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels} and {out_channels}.")
        if len(skip_channels) != 4 or min(skip_channels) < 1:
            raise ValueError(f"skip_channels needs 4 positive values (scales 1, 1/2, 1/4, 1/8), got {skip_channels}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.encoder = sam_vit(vit_size, img_size=vit_img_size, **{**dict(vit_args or {}), "in_chans": in_channels})
        self.patch_size = self.encoder.patch_size

        stems, previous = [], in_channels
        for scale, channels in enumerate(skip_channels):
            stems.append(UnetResBlock(2, previous, channels, kernel_size=3, stride=1 if scale == 0 else 2,
                                      norm_name=norm))
            previous = channels
        self.skips = nn.ModuleList(stems)

        ups, previous = [], self.encoder.out_channels
        for channels in reversed(skip_channels):
            ups.append(UnetUpBlock(2, previous, channels, kernel_size=3, stride=1, upsample_kernel_size=2,
                                   norm_name=norm))
            previous = channels
        self.decoder = nn.ModuleList(ups)
        self.head = UnetOutBlock(2, skip_channels[0], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: images of shape (N, in_channels, H, W), H and W positive multiples of 16.

        Returns:
            logits of shape (N, out_channels, H, W).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"TransUNet expects images of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}.")
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f"TransUNet needs H and W to be multiples of {self.patch_size}, got {tuple(x.shape)}.")
        skips = []
        features = x
        for stem in self.skips:
            features = stem(features)
            skips.append(features)
        features = self.encoder(x)[0]
        for up, skip in zip(self.decoder, reversed(skips)):
            features = up(features, skip)
        return self.head(features)

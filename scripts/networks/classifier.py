"""Image classifier on a pretrained encoder: linear probe (frozen encoder) or full fine-tuning."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import FullyConnectedNet
from torch import nn

__all__ = ["EncoderClassifier"]


class EncoderClassifier(nn.Module):
    """An encoder's pooled features followed by a fully connected head, as in the classification experiments of
    LVM-Med (Nguyen et al., "LVM-Med: Learning Large-Scale Self-Supervised Vision Models for Medical Imaging via
    Second-order Graph Matching", NeurIPS 2023, section 4.3 and appendix D.2).

    The encoder is any module whose ``forward(x)`` returns ``(feature_map, pooled)`` and which has an
    ``out_channels`` attribute: :class:`~scripts.networks.resnet_encoder.ResNet50Encoder` (pooled = global
    average of layer 4, 2048 features) or :class:`~scripts.networks.sam_vit.SamViTEncoder` (pooled = mean over
    all tokens of the 256-channel neck output, i.e. of SAM's image embedding).

    With ``freeze_encoder=True`` (linear probing) the encoder's parameters get ``requires_grad=False``, its
    forward runs without autograd, and it stays in eval mode even when the classifier is put in training mode,
    so that BatchNorm running statistics are not updated either: every parameter and buffer of the encoder
    stays bit-identical. The head is MONAI's ``FullyConnectedNet``: one linear layer when ``hidden_features``
    is empty, otherwise a multi-layer perceptron (appendix D.2 uses 2048 -> 512 -> 256 -> classes). With
    ``normalise_features`` the pooled features first pass a BatchNorm without affine parameters, as in the linear
    probes of MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022): it is a fixed affine
    map at inference, so the probe stays linear, and it makes the probe insensitive to the features' scale
    (which differs by orders of magnitude between encoders, and between pretrained and untrained ones).

    Args:
        encoder: the feature extractor (see above).
        num_classes: number of output logits, at least 2.
        freeze_encoder: linear probing (True) or full fine-tuning (False).
        hidden_features: widths of the head's hidden layers; ``()`` is a single linear layer.
        dropout: dropout probability in the head's hidden layers (ignored without hidden layers).
        normalise_features: standardise the pooled features with a non-affine ``BatchNorm1d`` (part of the head).

    Example::

        classifier = EncoderClassifier(ResNet50Encoder(), num_classes=3, freeze_encoder=True)
        logits = classifier(torch.randn(4, 3, 224, 224))  # (4, 3)
        optimizer = torch.optim.Adam(classifier.trainable_parameters(), lr=1e-3)
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        *,
        freeze_encoder: bool = True,
        hidden_features: Sequence[int] = (),
        dropout: float = 0.0,
        normalise_features: bool = True,
    ) -> None:
        super().__init__()
        in_features = getattr(encoder, "out_channels", None)
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"the encoder must have a positive integer attribute out_channels, got {in_features!r}.")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer of at least 2, got {num_classes!r}.")
        hidden = [int(width) for width in hidden_features]
        if any(width < 1 for width in hidden):
            raise ValueError(f"hidden_features must be positive widths, got {list(hidden_features)}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")
        self.encoder = encoder
        self.num_classes = num_classes
        self.freeze_encoder = bool(freeze_encoder)
        self.feature_norm = nn.BatchNorm1d(in_features, affine=False) if normalise_features else nn.Identity()
        self.head = FullyConnectedNet(in_features, num_classes, hidden, dropout=dropout if hidden else None)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> EncoderClassifier:
        """Sets training mode on the head (and on the encoder unless it is frozen, which stays in eval mode)."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser should update: the head's only for a linear probe, all otherwise."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (N, encoder.out_channels) of images (N, C, H, W)."""
        if self.freeze_encoder:
            with torch.no_grad():
                return self.encoder(images)[1]
        return self.encoder(images)[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images: (N, C, H, W), C and the size as the encoder expects.

        Returns:
            class logits (N, num_classes).
        """
        return self.head(self.feature_norm(self.features(images)))

"""Box-prompted segmentation network: SAM image encoder + prompt encoder + mask decoder under SAM's key names."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scripts.networks.sam_mask_decoder import SamMaskDecoder, TwoWayTransformer
from scripts.networks.sam_prompt_encoder import SamPromptEncoder
from scripts.networks.sam_vit import SamViTEncoder, sam_vit_b
from scripts.weights import LoadReport, WeightFileError, load_encoder_weights, load_weights, read_state_dict

__all__ = ["MedSAM", "build_medsam", "load_medsam_weights"]

logger = logging.getLogger(__name__)


class MedSAM(nn.Module):
    """SAM (Kirillov et al., "Segment Anything", ICCV 2023) prompted by boxes, trained as MedSAM (Ma et al., "Segment
    anything in medical images", Nature Communications 2024) and LVM-Med (Nguyen et al., "LVM-Med: Learning
    Large-Scale Self-Supervised Vision Models for Medical Imaging via Second-order Graph Matching", NeurIPS 2023,
    appendix B): image encoder and prompt encoder frozen, mask decoder fine-tuned.

    The state dict has SAM's top-level names ``image_encoder.*``, ``prompt_encoder.*`` and ``mask_decoder.*``, so a
    SAM/MedSAM checkpoint loads with ``strict=True`` (use an encoder with ``use_abs_pos=True`` for SAM's own files).

    The output is the single-mask logit map of the decoder at a quarter of the input resolution (SAM's "low-res
    logits"); :meth:`upsample` brings it to any size.

    Args:
        image_encoder: a :class:`~scripts.networks.sam_vit.SamViTEncoder` (or any module returning a feature map of
            ``prompt_encoder.embed_dim`` channels at 1/16 of the input, first in a tuple or alone).
        prompt_encoder: prompt encoder whose ``input_image_size`` is the encoder's input size.
        mask_decoder: mask decoder of the same width.
        freeze_encoders: set ``requires_grad=False`` on the image and prompt encoders and keep them in eval mode.

    Example::

        model = build_medsam(img_size=256)
        logits = model(torch.rand(2, 3, 256, 256), torch.tensor([[20.0, 30, 90, 120], [0, 0, 255, 255]]))
        masks = model.upsample(logits, (256, 256)) > 0  # (2, 1, 256, 256)
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: SamPromptEncoder,
        mask_decoder: SamMaskDecoder,
        freeze_encoders: bool = True,
    ) -> None:
        super().__init__()
        if prompt_encoder.embed_dim != mask_decoder.transformer_dim:
            raise ValueError(
                f"prompt encoder width {prompt_encoder.embed_dim} differs from mask decoder width "
                f"{mask_decoder.transformer_dim}."
            )
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.freeze_encoders = freeze_encoders
        if freeze_encoders:
            self.image_encoder.requires_grad_(False)
            self.prompt_encoder.requires_grad_(False)
            self.train(self.training)

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the images the prompt encoder expects box coordinates in."""
        return self.prompt_encoder.input_image_size

    def train(self, mode: bool = True) -> MedSAM:
        """Like ``nn.Module.train``, but frozen encoders stay in eval mode."""
        super().train(mode)
        if self.freeze_encoders:
            self.image_encoder.eval()
            self.prompt_encoder.eval()
        return self

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images of ``input_size`` -> image embeddings (B, embed_dim, H/16, W/16)."""
        if tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(
                f"images must be {self.input_size[0]} x {self.input_size[1]} (the prompt encoder's input_image_size), "
                f"got shape {tuple(images.shape)}."
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoders):
            out = self.image_encoder(images)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, inputs: torch.Tensor, boxes: torch.Tensor, embedded: bool = False) -> torch.Tensor:
        """
        Args:
            inputs: images (B, C_in, H, W) of ``input_size``, or with ``embedded=True`` their image embeddings
                (B, embed_dim, H/16, W/16), e.g. cached from :meth:`embed_images` since the encoder is frozen.
            boxes: one box per image (B, 4), or K boxes (K, 4) of a single image (B = 1), as (x_min, y_min, x_max,
                y_max) pixels of ``input_size``.
            embedded: whether ``inputs`` are image embeddings.

        Returns:
            mask logits (B or K, 1, H/4, W/4).
        """
        embeddings = inputs if embedded else self.embed_images(inputs)
        grid = self.prompt_encoder.image_embedding_size
        if embeddings.ndim != 4 or embeddings.shape[1] != self.prompt_encoder.embed_dim or tuple(embeddings.shape[2:]) != grid:
            raise ValueError(
                f"image embeddings must have shape (B, {self.prompt_encoder.embed_dim}, {grid[0]}, {grid[1]}), got "
                f"{tuple(embeddings.shape)}."
            )
        if boxes.ndim != 2 or boxes.shape[1] != 4 or embeddings.shape[0] not in (1, boxes.shape[0]):
            raise ValueError(
                f"boxes must have shape ({embeddings.shape[0]}, 4), one per image, or (K, 4) for a single image, got "
                f"{tuple(boxes.shape)}."
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoders):
            sparse, dense = self.prompt_encoder(boxes=boxes)
            image_pe = self.prompt_encoder.get_dense_pe()
        logits, _ = self.mask_decoder(embeddings, image_pe, sparse, dense, multimask_output=False)
        return logits

    @staticmethod
    def upsample(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Bilinear resize of (B, 1, h, w) logits to ``size`` (H, W), as SAM's ``postprocess_masks``."""
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def build_medsam(
    img_size: int = 1024,
    encoder: SamViTEncoder | None = None,
    freeze_encoders: bool = True,
    prompt_embed_dim: int = 256,
    **encoder_overrides: Any,
) -> MedSAM:
    """SAM ViT-B layout for inputs of ``img_size``: ``sam_vit_b`` encoder (or ``encoder``), prompt encoder with
    ``image_embedding_size = img_size / 16`` and SAM's mask decoder (two-way transformer depth 2, 8 heads, MLP 2048,
    3 multimask outputs, IoU head depth 3 of width 256).

    Args:
        img_size: side of the square input images; a multiple of 16.
        encoder: image encoder to use instead of ``sam_vit_b(img_size, **encoder_overrides)``; its output must have
            ``prompt_embed_dim`` channels. Its own ``img_size`` may differ (e.g. 1024 to hold released weights' shapes while
            inputs are 256).
        freeze_encoders: see :class:`MedSAM`.
        prompt_embed_dim: width of prompt tokens, image embedding and decoder.
        encoder_overrides: arguments of :func:`~scripts.networks.sam_vit.sam_vit_b`.
    """
    if img_size < 16 or img_size % 16:
        raise ValueError(f"img_size must be a positive multiple of 16 (the ViT patch size), got {img_size}.")
    image_encoder = (
        encoder if encoder is not None else sam_vit_b(img_size, out_chans=prompt_embed_dim, **encoder_overrides)
    )
    prompt_encoder = SamPromptEncoder(prompt_embed_dim, image_embedding_size=img_size // 16, input_image_size=img_size)
    mask_decoder = SamMaskDecoder(prompt_embed_dim, TwoWayTransformer(2, prompt_embed_dim, num_heads=8, mlp_dim=2048))
    return MedSAM(image_encoder, prompt_encoder, mask_decoder, freeze_encoders=freeze_encoders)


def load_medsam_weights(
    model: MedSAM,
    sam_checkpoint: str | os.PathLike | None = None,
    encoder_weights: str | os.PathLike | None = None,
) -> MedSAM:
    """Fills ``model`` from weight files and returns it; with neither file it is returned as initialised.

    Args:
        sam_checkpoint: a SAM or MedSAM state dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``);
            every key of the model must be in it.
        encoder_weights: image-encoder weights loaded afterwards (over the SAM encoder, if any), e.g. LVM-Med's
            ``lvmmed_vit.pth`` or ``models/encoder_vit.pt`` from the pretraining bundle, read by the bundle's one
            encoder loader (:func:`scripts.weights.load_encoder_weights`: prefixes, wrappers, a whole SAM file).
            The paper's setting: SAM's prompt encoder and decoder with the LVM-Med encoder.

    Raises:
        WeightFileError: a file is missing, unsafe or does not fit (the message names the file and the keys).
    """
    reports: list[tuple[str, LoadReport]] = []
    if sam_checkpoint is not None:
        state = read_state_dict(sam_checkpoint)
        if not any(key.startswith("mask_decoder.") for key in state):
            raise WeightFileError(
                f"{sam_checkpoint} has no mask_decoder.* keys: not a SAM/MedSAM checkpoint (for encoder-only weights "
                "use encoder_weights)"
            )
        reports.append((str(sam_checkpoint), load_weights(model, state, source=str(sam_checkpoint))))
    if encoder_weights is not None:
        reports.append((str(encoder_weights), load_encoder_weights(model.image_encoder, encoder_weights)))
    for source, report in reports:
        logger.info("weights from %s: %s", source, report)
    return model

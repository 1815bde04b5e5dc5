"""Segment-Anything prompt encoder (points, boxes, masks) with SAM's state-dict layout.

Parameter names and shapes equal SAM's ``prompt_encoder.*`` (Kirillov et al., "Segment Anything", ICCV 2023,
https://arxiv.org/abs/2304.02643), so the prompt encoder of a SAM or MedSAM checkpoint loads with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scripts.networks.sam_vit import LayerNorm2d

__all__ = ["RandomFourierPositions", "SamPromptEncoder"]

# Written here because no MONAI/torch module encodes continuous coordinates with random Fourier features
# (Tancik et al., NeurIPS 2020) under SAM's buffer name; MONAI's positional embeddings are learned or sin-cos tables
# over token indices.


class RandomFourierPositions(nn.Module):
    """Encodes (x, y) coordinates in [0, 1] as ``[sin(2 pi v), cos(2 pi v)]`` with ``v = (2 xy - 1) @ G``.

    ``G`` is the buffer ``positional_encoding_gaussian_matrix`` of shape (2, num_features), drawn from N(0, scale^2)
    and stored in checkpoints (SAM's ``pe_layer``).

    Args:
        num_features: columns of ``G``; the encoding has ``2 * num_features`` channels.
        scale: standard deviation of ``G``.
    """

    def __init__(self, num_features: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        if num_features < 1 or scale <= 0:
            raise ValueError(f"num_features must be positive and scale > 0, got {num_features} and {scale}.")
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_features))

    def encode(self, unit_xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) coordinates in [0, 1], x first -> (..., 2 * num_features)."""
        matrix = self.positional_encoding_gaussian_matrix
        phase = 2 * math.pi * ((2 * unit_xy.to(matrix.dtype) - 1) @ matrix)
        return torch.cat([phase.sin(), phase.cos()], dim=-1)

    def grid(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an (H, W) grid of cells: (2 * num_features, H, W)."""
        h, w = size
        matrix = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=matrix.device, dtype=matrix.dtype) + 0.5) / h
        xs = (torch.arange(w, device=matrix.device, dtype=matrix.dtype) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return self.encode(torch.stack([grid_x, grid_y], dim=-1)).permute(2, 0, 1)

    def pixels(self, xy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(B, N, 2) pixel coordinates (x, y) of an image of ``image_size`` (H, W) -> (B, N, 2 * num_features)."""
        scale = torch.tensor([image_size[1], image_size[0]], device=xy.device, dtype=torch.float32)
        return self.encode(xy.float() / scale)


class SamPromptEncoder(nn.Module):
    """Prompt encoder of SAM (Kirillov et al., "Segment Anything", ICCV 2023), used frozen by MedSAM (Ma et al.,
    "Segment anything in medical images", Nature Communications 2024) and LVM-Med (Nguyen et al., NeurIPS 2023,
    appendix B) for box-prompted segmentation.

    Points and box corners become sparse tokens (Fourier position + a learned type embedding), a low-resolution mask
    becomes a dense map; without a mask the dense map is the learned ``no_mask_embed`` everywhere.

    State-dict keys: ``pe_layer.positional_encoding_gaussian_matrix`` (2, embed_dim/2), ``point_embeddings.{0..3}.weight``
    (1, embed_dim) for negative point, positive point, top-left and bottom-right box corner, ``not_a_point_embed.weight``,
    ``mask_downscaling.{0,1,3,4,6}.*`` and ``no_mask_embed.weight``.

    Args:
        embed_dim: channels of the prompt tokens and of the image embedding they are matched to.
        image_embedding_size: (H, W) of the image encoder's output grid (input size / 16 for SAM's ViT).
        input_image_size: (H, W) of the images given to the image encoder; point and box coordinates are pixels of it.
        mask_in_chans: hidden channels of the mask encoder.

    Example::

        encoder = SamPromptEncoder(256, image_embedding_size=(16, 16), input_image_size=(256, 256))
        sparse, dense = encoder(boxes=torch.tensor([[30.0, 40.0, 120.0, 150.0]]))  # (1, 2, 256), (1, 256, 16, 16)
    """

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] | int = (64, 64),
        input_image_size: tuple[int, int] | int = (1024, 1024),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"embed_dim must be a positive even number, got {embed_dim}.")
        if mask_in_chans < 4 or mask_in_chans % 4:
            raise ValueError(f"mask_in_chans must be a positive multiple of 4, got {mask_in_chans}.")
        self.embed_dim = embed_dim
        self.image_embedding_size = _pair(image_embedding_size, "image_embedding_size")
        self.input_image_size = _pair(input_image_size, "input_image_size")
        self.mask_input_size = (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])

        self.pe_layer = RandomFourierPositions(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4, eps=1e-6),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans, eps=1e-6),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, (1, embed_dim, H, W) (SAM's method name)."""
        return self.pe_layer.grid(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
            raise ValueError(
                f"points must be coordinates (B, N, 2) and labels (B, N), got {tuple(coords.shape)} and "
                f"{tuple(labels.shape)}."
            )
        coords = coords.float() + 0.5  # pixel centres
        if pad:  # SAM adds one "not a point" token when no box is given
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        embedding = self.pe_layer.pixels(coords, self.input_image_size)
        labels = labels.unsqueeze(-1)
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, embedding)
        embedding = embedding + (labels == 0) * self.point_embeddings[0].weight
        return embedding + (labels == 1) * self.point_embeddings[1].weight

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must have shape (B, 4) as (x_min, y_min, x_max, y_max), got {tuple(boxes.shape)}.")
        corners = self.pe_layer.pixels(boxes.float().reshape(-1, 2, 2) + 0.5, self.input_image_size)
        corner_types = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return corners + corner_types

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            points: coordinates (B, N, 2) as (x, y) pixels of ``input_image_size`` and labels (B, N): 1 foreground,
                0 background, -1 padding.
            boxes: (B, 4) as (x_min, y_min, x_max, y_max) pixels of ``input_image_size``.
            masks: low-resolution mask logits (B, 1, 4 * H_emb, 4 * W_emb).

        Returns:
            sparse tokens (B, N_tokens, embed_dim) (N + 1 for points alone, N for points with boxes, + 2 per box) and
            the dense embedding (B, embed_dim, H_emb, W_emb).
        """
        sizes = {p.shape[0] for p in (points[0] if points else None, boxes, masks) if p is not None}
        if len(sizes) > 1:
            raise ValueError(f"points, boxes and masks must share one batch size, got {sorted(sizes)}.")
        batch = sizes.pop() if sizes else 1
        device = self.no_mask_embed.weight.device
        tokens = [torch.empty(batch, 0, self.embed_dim, device=device)]
        if points is not None:
            tokens.append(self._embed_points(points[0].to(device), points[1].to(device), pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes.to(device)))
        if masks is None:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        else:
            if masks.ndim != 4 or masks.shape[1] != 1 or tuple(masks.shape[2:]) != self.mask_input_size:
                raise ValueError(
                    f"masks must have shape (B, 1, {self.mask_input_size[0]}, {self.mask_input_size[1]}), "
                    f"got {tuple(masks.shape)}."
                )
            dense = self.mask_downscaling(masks.to(device))
        return torch.cat(tokens, dim=1), dense


def _pair(value: tuple[int, int] | int, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (H, W) pair, got {value}.")
    return pair  # type: ignore[return-value]

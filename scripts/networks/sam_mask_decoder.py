"""Segment-Anything mask decoder and its two-way transformer, with SAM's state-dict layout.

Parameter names and shapes equal SAM's ``mask_decoder.*`` (Kirillov et al., "Segment Anything", ICCV 2023,
https://arxiv.org/abs/2304.02643), so the mask decoder of a SAM or MedSAM checkpoint loads with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scripts.networks.sam_vit import LayerNorm2d

__all__ = ["SamMaskDecoder", "TwoWayTransformer"]

# Written here rather than built from MONAI blocks: MONAI's CrossAttentionBlock/MLPBlock name their weights
# to_q/to_k/linear1 ..., and SAM's attention projects to a reduced inner width (``downsample_rate``), so SAM
# checkpoints would not load. The attention arithmetic itself is torch's scaled_dot_product_attention.


class _ProjectedAttention(nn.Module):
    """Multi-head attention whose queries, keys and values are projected to ``dim / downsample_rate`` channels."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = dim // downsample_rate
        if downsample_rate < 1 or inner % num_heads or inner < num_heads:
            raise ValueError(
                f"dim / downsample_rate ({dim} / {downsample_rate}) must be a positive multiple of num_heads "
                f"({num_heads})."
            )
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, dim), k and v (B, Nk, dim) -> (B, Nq, dim)."""
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class _TokenMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class _TwoWayBlock(nn.Module):
    """Token self-attention, tokens -> image cross-attention, token MLP, image -> tokens cross-attention (post-norm)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_pe: bool) -> None:
        super().__init__()
        self.skip_first_pe = skip_first_pe
        self.self_attn = _ProjectedAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = _ProjectedAttention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _TokenMLP(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = _ProjectedAttention(dim, num_heads, downsample_rate)

    def forward(
        self, tokens: torch.Tensor, image: torch.Tensor, token_pe: torch.Tensor, image_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_pe:  # the first block replaces the tokens by their self-attention
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            query = tokens + token_pe
            tokens = tokens + self.self_attn(query, query, tokens)
        tokens = self.norm1(tokens)
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(tokens + token_pe, image + image_pe, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        image = self.norm4(image + self.cross_attn_image_to_token(image + image_pe, tokens + token_pe, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer: prompt tokens and image tokens attend to each other in ``depth`` blocks, then the
    tokens attend to the image once more (Kirillov et al., "Segment Anything", ICCV 2023, section 3 and appendix A).

    State-dict keys: ``layers.{i}.{self_attn,cross_attn_token_to_image,cross_attn_image_to_token}.{q,k,v,out}_proj``,
    ``layers.{i}.mlp.{lin1,lin2}``, ``layers.{i}.norm{1..4}``, ``final_attn_token_to_image.*``, ``norm_final_attn``.

    Args:
        depth: number of two-way blocks.
        embedding_dim: channels of tokens and image embedding.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLP.
        attention_downsample_rate: cross-attention works in ``embedding_dim / attention_downsample_rate`` channels.
    """

    def __init__(
        self, depth: int = 2, embedding_dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        if depth < 1 or mlp_dim < 1:
            raise ValueError(f"depth and mlp_dim must be positive, got {depth} and {mlp_dim}.")
        self.layers = nn.ModuleList(
            _TwoWayBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate, skip_first_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = _ProjectedAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embedding: (B, C, H, W).
            image_pe: positional encoding of the same shape.
            point_embedding: prompt and output tokens (B, N, C), also used as their positional encoding.

        Returns:
            the tokens (B, N, C) and the image tokens (B, H * W, C) after the transformer.
        """
        image = image_embedding.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2)
        tokens = point_embedding
        for layer in self.layers:
            tokens, image = layer(tokens, image, point_embedding, image_pe)
        attended = self.final_attn_token_to_image(tokens + point_embedding, image + image_pe, image)
        return self.norm_final_attn(tokens + attended), image


class _HyperMLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them, under SAM's ``layers.{j}`` names."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class SamMaskDecoder(nn.Module):
    """Mask decoder of SAM (Kirillov et al., "Segment Anything", ICCV 2023); the part MedSAM (Ma et al., Nature
    Communications 2024) and LVM-Med (Nguyen et al., NeurIPS 2023, appendix B) fine-tune for box-prompted medical
    segmentation.

    An IoU token and ``num_multimask_outputs + 1`` mask tokens join the prompt tokens in a :class:`TwoWayTransformer`;
    the image tokens are upscaled 4x by transposed convolutions and each mask token, through its own MLP, gives the
    weights of a dot product with every upscaled pixel. Mask 0 is the single-mask output, masks 1.. the ambiguity-aware
    outputs.

    State-dict keys: ``transformer.*``, ``iou_token.weight`` (1, C), ``mask_tokens.weight`` (num_multimask_outputs + 1,
    C), ``output_upscaling.{0,1,3}.*``, ``output_hypernetworks_mlps.{i}.layers.{0,1,2}.*`` and
    ``iou_prediction_head.layers.{j}.*``.

    Args:
        transformer_dim: channels C of tokens and image embedding.
        transformer: the two-way transformer; None builds SAM's (depth 2, 8 heads, MLP 2048).
        num_multimask_outputs: ambiguity-aware masks.
        iou_head_depth: layers of the IoU prediction MLP.
        iou_head_hidden_dim: hidden width of the IoU prediction MLP.

    Example::

        decoder = SamMaskDecoder(256)
        pe = torch.randn(1, 256, 16, 16)
        masks, iou = decoder(torch.randn(2, 256, 16, 16), pe, torch.randn(2, 2, 256), torch.randn(2, 256, 16, 16))
        # masks (2, 1, 64, 64), iou (2, 1)
    """

    def __init__(
        self,
        transformer_dim: int = 256,
        transformer: nn.Module | None = None,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        if transformer_dim < 8 or transformer_dim % 8:
            raise ValueError(f"transformer_dim must be a positive multiple of 8, got {transformer_dim}.")
        if num_multimask_outputs < 0 or iou_head_depth < 1:
            raise ValueError(
                f"num_multimask_outputs must be >= 0 and iou_head_depth >= 1, got {num_multimask_outputs} and "
                f"{iou_head_depth}."
            )
        self.transformer_dim = transformer_dim
        self.transformer = transformer if transformer is not None else TwoWayTransformer(embedding_dim=transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4, eps=1e-6),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            _HyperMLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = _HyperMLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embeddings: (1, C, H, W), shared by all prompts, or (B, C, H, W), one image per prompt.
            image_pe: positional encoding (1, C, H, W) (``SamPromptEncoder.get_dense_pe()``).
            sparse_prompt_embeddings: prompt tokens (B, N, C).
            dense_prompt_embeddings: (B, C, H, W).
            multimask_output: return the ambiguity-aware masks 1.. instead of the single mask 0.

        Returns:
            mask logits (B, M, 4H, 4W) and predicted IoUs (B, M), M = 1 or ``num_multimask_outputs``.
        """
        batch, _, dim = sparse_prompt_embeddings.shape
        if image_embeddings.ndim != 4 or image_embeddings.shape[1] != self.transformer_dim:
            raise ValueError(
                f"image_embeddings must have shape (B, {self.transformer_dim}, H, W), got {tuple(image_embeddings.shape)}."
            )
        if image_embeddings.shape[0] not in (1, batch) or dim != self.transformer_dim:
            raise ValueError(
                f"image_embeddings {tuple(image_embeddings.shape)} need batch 1 or that of the prompt tokens "
                f"{tuple(sparse_prompt_embeddings.shape)}, whose last dimension must be {self.transformer_dim}."
            )
        if dense_prompt_embeddings.shape[-2:] != image_embeddings.shape[-2:] or image_pe.shape[-2:] != image_embeddings.shape[-2:]:
            raise ValueError(
                f"dense prompt embeddings {tuple(dense_prompt_embeddings.shape)} and image_pe {tuple(image_pe.shape)} "
                f"must match the image embedding grid {tuple(image_embeddings.shape[-2:])} (check the prompt "
                "encoder's image_embedding_size)."
            )
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        image = image_embeddings.expand(batch, -1, -1, -1) + dense_prompt_embeddings
        image_pe = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = image.shape

        tokens, image_tokens = self.transformer(image, image_pe, tokens)
        iou_token, mask_tokens = tokens[:, 0], tokens[:, 1 : 1 + self.num_mask_tokens]
        upscaled = self.output_upscaling(image_tokens.transpose(1, 2).reshape(b, c, h, w))
        weights = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = torch.einsum("bmc,bchw->bmhw", weights, upscaled)
        iou = self.iou_prediction_head(iou_token)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou[:, selected]

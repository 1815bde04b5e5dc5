"""Segment-Anything ViT image encoder with SAM's state-dict layout.

The encoder of Kirillov et al., "Segment Anything", ICCV 2023 (https://arxiv.org/abs/2304.02643): a plain ViT
with windowed attention in most blocks, a few global-attention blocks, decomposed relative positions and a
convolutional neck. Parameter names and shapes equal SAM's ``image_encoder.*``, so SAM checkpoints and the
LVM-Med ViT-B release (``lvmmed_vit.pth``; Nguyen et al., "LVM-Med: Learning Large-Scale Self-Supervised Vision
Models for Medical Imaging via Second-order Graph Matching", NeurIPS 2023) load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.attention_utils import add_decomposed_rel_pos
from torch import nn

__all__ = ["SAM_VIT_SIZES", "LayerNorm2d", "SamViTEncoder", "sam_vit", "sam_vit_b", "sam_vit_h", "sam_vit_l", "sam_vit_size"]

# Written here because MONAI's window helpers (monai.networks.nets.swin_unetr.window_partition/window_reverse)
# require a grid already divisible by the window and flatten each window; SAM zero-pads the 2D channels-last grid
# (e.g. 64x64 tokens, 14x14 windows), keeps windows as 2D grids for relative positions and crops the padding after.


def _window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad (N, H, W, C) to multiples of ``window`` and cut it into (N * nH * nW, window, window, C)."""
    n, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(n, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window, window, c), (hp, wp)


def _window_unpartition(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`_window_partition`: reassemble the padded grid and crop it to ``hw``."""
    hp, wp = padded_hw
    n = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(n, hp // window, wp // window, window, window, -1).transpose(2, 3)
    x = x.reshape(n, hp, wp, -1)
    return x[:, : hw[0], : hw[1]].contiguous()


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an (N, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> channels-last tokens (N, H/patch, W/patch, embed_dim)."""
        return self.proj(x).permute(0, 2, 3, 1)


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.lin2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class _Attention(nn.Module):
    """Multi-head self-attention over an (N, H, W, C) grid with optional decomposed relative positions.

    ``rel_pos_h``/``rel_pos_w`` have shape (2 * size - 1, head_dim) for the grid size ``rel_pos_size`` they were
    trained on; MONAI's helper interpolates them when the grid differs.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, use_rel_pos: bool, rel_pos_size: tuple[int, int]
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        # (3, N * heads, H * W, head_dim)
        qkv = self.qkv(x).reshape(n, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, n * self.num_heads, h * w, -1).unbind(0)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            logits = add_decomposed_rel_pos(logits, q, [self.rel_pos_h, self.rel_pos_w], (h, w), (h, w))
        out = logits.softmax(dim=-1) @ v
        out = out.reshape(n, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(n, h, w, c)
        return self.proj(out)


class _Block(nn.Module):
    """Pre-norm transformer block; attends within ``window_size`` windows, or globally when it is None."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        use_rel_pos: bool,
        window_size: int | None,
        grid_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        rel_pos_size = grid_size if window_size is None else (window_size, window_size)
        self.attn = _Attention(dim, num_heads, qkv_bias, use_rel_pos, rel_pos_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window_size is None:
            y = self.attn(y)
        else:
            windows, padded_hw = _window_partition(y, self.window_size)
            y = _window_unpartition(self.attn(windows), self.window_size, padded_hw, (x.shape[1], x.shape[2]))
        x = x + y
        return x + self.mlp(self.norm2(x))


class SamViTEncoder(nn.Module):
    """Image encoder of SAM (Kirillov et al., "Segment Anything", ICCV 2023), as used by LVM-Med (Nguyen et al.,
    "LVM-Med: Learning Large-Scale Self-Supervised Vision Models for Medical Imaging via Second-order Graph
    Matching", NeurIPS 2023).

    State-dict keys: ``patch_embed.proj``, ``pos_embed`` (only with ``use_abs_pos``), ``blocks.{i}.norm1``,
    ``blocks.{i}.attn.{qkv,proj,rel_pos_h,rel_pos_w}``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.{lin1,lin2}`` and
    ``neck.{0,1,2,3}``, with SAM's shapes. Inputs whose size differs from ``img_size`` (multiples of
    ``patch_size``) are accepted: ``pos_embed`` is resized bicubically and the global blocks' relative positions
    linearly.

    Args:
        img_size: side of the square training image; sets the ``pos_embed`` grid (1, img_size/patch_size,
            img_size/patch_size, embed_dim) and the global blocks' ``rel_pos_*`` (2*img_size/patch_size-1,
            head_dim).
        patch_size: side of the non-overlapping patches (kernel and stride of ``patch_embed.proj``).
        in_chans: channels of the input image.
        embed_dim: token dimension; must be divisible by ``num_heads``.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: hidden size of each block's MLP relative to ``embed_dim``.
        out_chans: channels of the neck output.
        qkv_bias: whether the qkv projection has a bias.
        use_abs_pos: add a learned absolute position embedding (SAM has one; the LVM-Med release does not).
        use_rel_pos: add decomposed relative positions in attention.
        window_size: side of the attention windows of the non-global blocks, in tokens; rel_pos_* of those blocks
            have shape (2*window_size-1, head_dim).
        global_attn_indexes: indexes of blocks attending over the whole token grid, each in [0, depth).

    Example::

        encoder = sam_vit_b()
        feature_map, pooled = encoder(torch.randn(1, 3, 1024, 1024))  # (1, 256, 64, 64), (1, 256)
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_abs_pos: bool = False,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        sizes = {
            "img_size": img_size,
            "patch_size": patch_size,
            "in_chans": in_chans,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "out_chans": out_chans,
            "window_size": window_size,
        }
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}.")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size}).")
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_attn_indexes must lie in [0, depth={depth}), got {bad}.")

        self.patch_size = patch_size
        self.in_chans = in_chans
        self.out_channels = out_chans
        grid = img_size // patch_size
        self.patch_embed = _PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed: nn.Parameter | None = (
            nn.Parameter(torch.zeros(1, grid, grid, embed_dim)) if use_abs_pos else None
        )
        global_set = set(global_attn_indexes)
        self.blocks = nn.ModuleList(
            _Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                use_rel_pos,
                window_size=None if i in global_set else window_size,
                grid_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans, eps=1e-6),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans, eps=1e-6),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: images of shape (N, in_chans, H, W), H and W positive multiples of ``patch_size``.

        Returns:
            the neck feature map (N, out_chans, H/patch_size, W/patch_size) and its spatial mean (N, out_chans).
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"SamViTEncoder expects images of shape (N, {self.in_chans}, H, W), got {tuple(x.shape)}."
            )
        h, w = x.shape[2:]
        if h < self.patch_size or w < self.patch_size or h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"SamViTEncoder needs H and W to be positive multiples of patch_size={self.patch_size}, "
                f"got input shape {tuple(x.shape)}."
            )
        tokens = self.patch_embed(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[1:3] != tokens.shape[1:3]:
                pos = F.interpolate(
                    pos.permute(0, 3, 1, 2), size=tokens.shape[1:3], mode="bicubic", align_corners=False
                ).permute(0, 2, 3, 1)
            tokens = tokens + pos
        for block in self.blocks:
            tokens = block(tokens)
        feature_map = self.neck(tokens.permute(0, 3, 1, 2))
        return feature_map, feature_map.mean(dim=(2, 3))


# SAM's three image encoders (Kirillov et al., ICCV 2023, ``build_sam_vit_{b,l,h}``), which LVM-Med also builds
# (``vit_encoder_b/l/h``, without absolute position embedding): 16x16 patches, 14x14 windows, 256-channel neck.
SAM_VIT_SIZES: dict[str, dict[str, Any]] = {
    "b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}


def sam_vit(size: str = "b", img_size: int = 1024, **overrides: Any) -> SamViTEncoder:
    """SAM ViT-B, ViT-L or ViT-H image encoder (see :data:`SAM_VIT_SIZES`).

    Args:
        size: ``"b"`` (768 wide, 12 blocks, 12 heads), ``"l"`` (1024, 24, 16) or ``"h"`` (1280, 32, 16).
        img_size: side of the square training image (1024 for the released weights).
        overrides: any other :class:`SamViTEncoder` argument, e.g. ``use_abs_pos=True`` for SAM's own checkpoint.

    Example::

        encoder = sam_vit("h", use_abs_pos=False)  # LVM-Med's ViT-H layout
    """
    if size not in SAM_VIT_SIZES:
        raise ValueError(f"size must be one of {sorted(SAM_VIT_SIZES)}, got {size!r}.")
    settings: dict[str, Any] = {
        "patch_size": 16,
        "mlp_ratio": 4.0,
        "out_chans": 256,
        "qkv_bias": True,
        "use_rel_pos": True,
        "window_size": 14,
        **SAM_VIT_SIZES[size],
    }
    settings.update(overrides)
    return SamViTEncoder(img_size=img_size, **settings)


def sam_vit_b(img_size: int = 1024, **overrides: Any) -> SamViTEncoder:
    """SAM ViT-B image encoder (the LVM-Med ViT backbone): 12 blocks of width 768 with 12 heads, 14x14 windows,
    global attention in blocks 2, 5, 8 and 11, 16x16 patches and a 256-channel neck (:func:`sam_vit` ``"b"``)."""
    return sam_vit("b", img_size, **overrides)


def sam_vit_l(img_size: int = 1024, **overrides: Any) -> SamViTEncoder:
    """SAM ViT-L image encoder: 24 blocks of width 1024 with 16 heads, global attention in blocks 5, 11, 17, 23."""
    return sam_vit("l", img_size, **overrides)


def sam_vit_h(img_size: int = 1024, **overrides: Any) -> SamViTEncoder:
    """SAM ViT-H image encoder: 32 blocks of width 1280 with 16 heads, global attention in blocks 7, 15, 23, 31."""
    return sam_vit("h", img_size, **overrides)


def sam_vit_size(state: Mapping[str, torch.Tensor]) -> str:
    """``"b"``, ``"l"`` or ``"h"``: the SAM encoder size of an image-encoder state dict, from its width
    (``patch_embed.proj.weight``) and its number of blocks.

    Raises:
        ValueError: the state is not a SAM image encoder of one of the three sizes.
    """
    weight = state.get("patch_embed.proj.weight")
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    for size, settings in SAM_VIT_SIZES.items():
        if weight is not None and weight.shape[0] == settings["embed_dim"] and depth == settings["depth"]:
            return size
    width = None if weight is None else int(weight.shape[0])
    known = ", ".join(f"{name}: {settings['embed_dim']} x {settings['depth']}" for name, settings in SAM_VIT_SIZES.items())
    raise ValueError(f"state of width {width} with {depth} blocks is none of SAM's ViT sizes (width x blocks: {known}).")

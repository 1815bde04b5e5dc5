"""Tests for the SAM ViT image encoder (scripts/networks/sam_vit.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from scripts.networks.sam_vit import SamViTEncoder, sam_vit_b

SMALL: dict[str, Any] = {
    "img_size": 64,
    "patch_size": 16,
    "embed_dim": 48,
    "depth": 4,
    "num_heads": 3,
    "window_size": 2,
    "global_attn_indexes": (1, 3),
    "out_chans": 32,
}


def sam_vit_b_layout(with_pos_embed: bool) -> dict[str, tuple[int, ...]]:
    """SAM ViT-B image-encoder state-dict layout, written out from SAM's published configuration."""
    dim, depth, heads, window, grid, out = 768, 12, 12, 14, 1024 // 16, 256
    head_dim = dim // heads
    layout: dict[str, tuple[int, ...]] = {"patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,)}
    if with_pos_embed:
        layout["pos_embed"] = (1, grid, grid, dim)
    for i in range(depth):
        rel = 2 * (grid if i in (2, 5, 8, 11) else window) - 1
        p = f"blocks.{i}."
        layout.update(
            {
                p + "norm1.weight": (dim,),
                p + "norm1.bias": (dim,),
                p + "attn.rel_pos_h": (rel, head_dim),
                p + "attn.rel_pos_w": (rel, head_dim),
                p + "attn.qkv.weight": (3 * dim, dim),
                p + "attn.qkv.bias": (3 * dim,),
                p + "attn.proj.weight": (dim, dim),
                p + "attn.proj.bias": (dim,),
                p + "norm2.weight": (dim,),
                p + "norm2.bias": (dim,),
                p + "mlp.lin1.weight": (4 * dim, dim),
                p + "mlp.lin1.bias": (4 * dim,),
                p + "mlp.lin2.weight": (dim, 4 * dim),
                p + "mlp.lin2.bias": (dim,),
            }
        )
    layout.update(
        {
            "neck.0.weight": (out, dim, 1, 1),
            "neck.1.weight": (out,),
            "neck.1.bias": (out,),
            "neck.2.weight": (out, out, 3, 3),
            "neck.3.weight": (out,),
            "neck.3.bias": (out,),
        }
    )
    return layout


@pytest.mark.parametrize("use_abs_pos", [False, True])
def test_vit_b_state_dict_layout_matches_sam(use_abs_pos: bool) -> None:
    with torch.device("meta"):
        encoder = sam_vit_b(use_abs_pos=use_abs_pos)
    layout = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert layout == sam_vit_b_layout(with_pos_embed=use_abs_pos)
    assert encoder.out_channels == 256


def test_vit_b_loads_checkpoint_strictly() -> None:
    torch.manual_seed(0)
    checkpoint = {k: torch.randn(s) for k, s in sam_vit_b_layout(with_pos_embed=False).items()}
    with torch.device("meta"):
        encoder = sam_vit_b()
    encoder.load_state_dict(checkpoint, strict=True, assign=True)
    loaded = encoder.state_dict()
    for key in ("patch_embed.proj.weight", "blocks.5.attn.rel_pos_h", "blocks.11.mlp.lin2.bias", "neck.3.weight"):
        assert torch.equal(loaded[key], checkpoint[key])
    # SAM's own checkpoint carries pos_embed: it needs use_abs_pos=True and is rejected otherwise.
    with torch.device("meta"):
        encoder = sam_vit_b()
    with pytest.raises(RuntimeError, match="pos_embed"):
        encoder.load_state_dict({**checkpoint, "pos_embed": torch.randn(1, 64, 64, 768)}, strict=True, assign=True)


def _randomise_rel_pos(encoder: SamViTEncoder) -> None:
    # rel_pos_* start at zero (as in SAM); random values make interpolation and locality tests meaningful.
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                param.normal_()


@pytest.mark.parametrize("use_abs_pos", [False, True])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_forward_backward_shapes(use_abs_pos: bool, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    encoder = SamViTEncoder(**SMALL, use_abs_pos=use_abs_pos)
    _randomise_rel_pos(encoder)
    x = torch.randn(2, 3, *size)
    feature_map, pooled = encoder(x)
    assert feature_map.shape == (2, 32, size[0] // 16, size[1] // 16)
    assert pooled.shape == (2, 32)
    torch.testing.assert_close(pooled, feature_map.mean(dim=(2, 3)))
    (feature_map.square().mean() + pooled.sum()).backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert encoder.blocks[1].attn.rel_pos_h.grad.abs().sum() > 0
    if use_abs_pos:
        assert encoder.pos_embed is not None and encoder.pos_embed.grad.abs().sum() > 0


def _block_outputs(encoder: SamViTEncoder, x: torch.Tensor) -> list[torch.Tensor]:
    """Token grids (N, h, w, C) after each block, captured before the neck mixes neighbours."""
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach())) for b in encoder.blocks]
    try:
        with torch.no_grad():
            encoder(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])  # 4x4 tokens, and 3x5 tokens (padded to 4x6)
def test_windowed_attention_is_local(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    kwargs = {**SMALL, "depth": 1}
    windowed = SamViTEncoder(**{**kwargs, "global_attn_indexes": ()})
    glob = SamViTEncoder(**{**kwargs, "global_attn_indexes": (0,)})
    for encoder in (windowed, glob):
        _randomise_rel_pos(encoder)
    x = torch.randn(1, 3, *size)
    x_perturbed = x.clone()
    x_perturbed[:, :, :16, :16] += 3.0  # token (0, 0), inside window {0, 1} x {0, 1}

    h, w = size[0] // 16, size[1] // 16
    in_first_window = torch.zeros(h, w, dtype=torch.bool)
    in_first_window[:2, :2] = True

    diff = (_block_outputs(windowed, x)[0] - _block_outputs(windowed, x_perturbed)[0]).abs().amax(dim=(0, 3))
    assert diff[~in_first_window].max() < 1e-6  # other windows untouched
    assert diff[0, 1] > 1e-3 and diff[1, 0] > 1e-3 and diff[1, 1] > 1e-3  # neighbours in the window see it

    diff = (_block_outputs(glob, x)[0] - _block_outputs(glob, x_perturbed)[0]).abs().amax(dim=(0, 3))
    assert (diff[~in_first_window] > 1e-5).all()  # a global block propagates everywhere


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 1, 64, 64), r"\(1, 1, 64, 64\)"),
        ((1, 3, 64, 56), r"multiples of patch_size=16.*\(1, 3, 64, 56\)"),
        ((1, 3, 8, 64), r"multiples of patch_size=16.*\(1, 3, 8, 64\)"),
        ((3, 64, 64), r"\(3, 64, 64\)"),
    ],
)
def test_bad_input_raises(shape: tuple[int, ...], match: str) -> None:
    encoder = SamViTEncoder(**SMALL)
    with pytest.raises(ValueError, match=match):
        encoder(torch.zeros(shape))


@pytest.mark.parametrize(
    "override, match",
    [
        ({"embed_dim": 50}, "embed_dim .*divisible by num_heads"),
        ({"global_attn_indexes": (1, 4)}, r"global_attn_indexes.*depth=4.*\[4\]"),
        ({"global_attn_indexes": (-1,)}, r"global_attn_indexes.*\[-1\]"),
        ({"img_size": 72}, "img_size .*multiple of patch_size"),
        ({"window_size": 0}, "window_size must be a positive"),
        ({"depth": 0}, "depth must be a positive"),
        ({"mlp_ratio": 0.0}, "mlp_ratio must be positive"),
    ],
)
def test_bad_constructor_values_raise(override: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamViTEncoder(**{**SMALL, **override})

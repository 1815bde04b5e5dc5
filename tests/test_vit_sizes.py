"""SAM ViT-L and ViT-H (Kirillov et al., ICCV 2023; LVM-Med's ``vit_encoder_l``/``vit_encoder_h``): keys and shapes
against tables written out from SAM's published configuration, on the meta device (no 300M/630M allocation), and
the size option of every workflow that takes a ViT."""

from __future__ import annotations

import pytest
import torch

from scripts.convert_weights import convert_state_dict
from scripts.networks.classifier import EncoderClassifier
from scripts.networks.medsam import build_medsam
from scripts.networks.projector import ProjectionHead
from scripts.networks.sam_vit import sam_vit, sam_vit_size
from scripts.networks.ssl_network import LVMMedNetwork
from scripts.networks.transunet import TransUNet
from scripts.weights import WeightFileError

# SAM's build_sam_vit_l / build_sam_vit_h: (embed_dim, depth, num_heads, global attention blocks)
SAM_CONFIGURATION = {
    "l": (1024, 24, 16, (5, 11, 17, 23)),
    "h": (1280, 32, 16, (7, 15, 23, 31)),
}
PARAMETERS = {"l": 304_083_968, "h": 631_783_168}  # image-encoder parameters without pos_embed (1024 / 16 = 64 grid)


def sam_layout(size: str, with_pos_embed: bool) -> dict[str, tuple[int, ...]]:
    """The state-dict layout of SAM's image encoder of ``size`` for 1024x1024 inputs, 16x16 patches, 14x14 windows."""
    dim, depth, heads, global_blocks = SAM_CONFIGURATION[size]
    grid, window, out, head_dim = 64, 14, 256, dim // heads
    layout: dict[str, tuple[int, ...]] = {"patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,)}
    if with_pos_embed:
        layout["pos_embed"] = (1, grid, grid, dim)
    for i in range(depth):
        rel = 2 * (grid if i in global_blocks else window) - 1
        p = f"blocks.{i}."
        layout |= {
            p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
            p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
            p + "attn.rel_pos_h": (rel, head_dim), p + "attn.rel_pos_w": (rel, head_dim),
            p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
            p + "mlp.lin1.weight": (4 * dim, dim), p + "mlp.lin1.bias": (4 * dim,),
            p + "mlp.lin2.weight": (dim, 4 * dim), p + "mlp.lin2.bias": (dim,),
        }
    return layout | {
        "neck.0.weight": (out, dim, 1, 1), "neck.1.weight": (out,), "neck.1.bias": (out,),
        "neck.2.weight": (out, out, 3, 3), "neck.3.weight": (out,), "neck.3.bias": (out,),
    }


@pytest.mark.parametrize("size", ["l", "h"])
@pytest.mark.parametrize("use_abs_pos", [False, True])
def test_encoder_keys_and_shapes_equal_sams(size: str, use_abs_pos: bool) -> None:
    with torch.device("meta"):
        encoder = sam_vit(size, use_abs_pos=use_abs_pos)
    state = {key: tuple(value.shape) for key, value in encoder.state_dict().items()}
    assert state == sam_layout(size, with_pos_embed=use_abs_pos)
    without_pos = sum(p.numel() for name, p in encoder.named_parameters() if name != "pos_embed")
    assert without_pos == PARAMETERS[size]
    global_blocks = [i for i, block in enumerate(encoder.blocks) if block.window_size is None]
    assert tuple(global_blocks) == SAM_CONFIGURATION[size][3]


@pytest.mark.parametrize("size", ["b", "l", "h"])
def test_size_is_read_from_a_state_dict(size: str) -> None:
    with torch.device("meta"):
        assert sam_vit_size(sam_vit(size).state_dict()) == size
    with pytest.raises(ValueError, match="none of SAM's ViT sizes"):
        sam_vit_size({"patch_embed.proj.weight": torch.empty(640, 3, 16, 16, device="meta")})
    with pytest.raises(ValueError, match="size must be one of"):
        sam_vit("g")


@pytest.mark.parametrize("size", ["l", "h"])
def test_converter_detects_the_width_and_depth_of_lvmmed_and_sam_files(size: str) -> None:
    """``lvmmed_vit``-style (no pos_embed) and SAM-style (pos_embed, image_encoder. prefix) files of ViT-L/H on the
    meta device: the converter picks the size from the file and every key and shape is checked."""
    layout = sam_layout(size, with_pos_embed=False)
    lvmmed = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
    with torch.device("meta"):  # the converter builds its target encoder on the meta device too
        converted, report = convert_state_dict(lvmmed, f"lvmmed_vit_{size}.pth")
    assert f"ViT-{size.upper()} image encoder for 1024x1024 images" in str(report)
    assert set(converted) == set(layout)
    sam = {f"image_encoder.{key}": torch.empty(shape, device="meta")
           for key, shape in sam_layout(size, with_pos_embed=True).items()}
    with torch.device("meta"):
        _, report = convert_state_dict(sam, f"sam_vit_{size}.pth", kind="vit")
    assert "with pos_embed" in str(report) and report.parts["image_encoder"].loaded[0]
    broken = dict(lvmmed)
    del broken["blocks.3.mlp.lin1.bias"]
    with torch.device("meta"), pytest.raises(WeightFileError, match="blocks.3.mlp.lin1.bias"):
        convert_state_dict(broken, "broken.pth")


@pytest.mark.parametrize("size", ["l", "h"])
def test_every_vit_workflow_takes_the_larger_encoders(size: str) -> None:
    """Pretraining, TransUNet segmentation, classification and prompt segmentation with ViT-L/H."""
    dim = SAM_CONFIGURATION[size][0]
    with torch.device("meta"):
        pretraining = LVMMedNetwork(sam_vit(size), ProjectionHead(256, 128))
        transunet = TransUNet(in_channels=1, out_channels=3, vit_size=size)
        classifier = EncoderClassifier(sam_vit(size), num_classes=3)
        medsam = build_medsam(256, encoder=sam_vit(size))
    for network in (pretraining, transunet, classifier):
        assert len(network.encoder.blocks) == SAM_CONFIGURATION[size][1]
    assert transunet.encoder.patch_embed.proj.weight.shape == (dim, 1, 16, 16)
    assert medsam.image_encoder.neck[0].weight.shape == (256, dim, 1, 1)


def test_a_small_larger_layout_runs_forward() -> None:
    """The ViT-H layout (16 heads, its global blocks) with fewer blocks and a small input, to show the forward pass
    of the options works off the meta device too."""
    encoder = sam_vit("h", img_size=64, depth=8, global_attn_indexes=(7,), embed_dim=64, window_size=2).eval()
    feature_map, pooled = encoder(torch.randn(2, 3, 64, 64))
    assert feature_map.shape == (2, 256, 4, 4) and pooled.shape == (2, 256)

"""Segmentation networks: shapes, input checks, TorchScript, and pretrained encoder loading from release layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scripts.networks.resnet_encoder import ResNet50Encoder
from scripts.networks.sam_vit import sam_vit_b
from scripts.networks.transunet import TransUNet
from scripts.networks.unet_r50 import ResNet50UNet
from scripts.segmentation.architectures import segmentation_network
from scripts.weights import WeightFileError, load_pretrained_encoder
from test_resnet_encoder import torchvision_resnet50_layout
from test_sam_vit import sam_vit_b_layout

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,), "window_size": 4}


def tiny_transunet(in_channels: int = 1, out_channels: int = 3) -> TransUNet:
    return TransUNet(in_channels, out_channels, vit_img_size=64, vit_args=TINY_VIT, skip_channels=(4, 8, 8, 16))


@pytest.fixture(scope="module")
def unet() -> ResNet50UNet:
    return ResNet50UNet(in_channels=1, out_channels=3).eval()


def test_unet_r50_predicts_one_map_per_class_at_input_size(unet: ResNet50UNet) -> None:
    with torch.no_grad():
        logits = unet(torch.randn(2, 1, 64, 96))
    assert logits.shape == (2, 3, 64, 96)
    assert set(ResNet50Encoder(1).state_dict()) == set(unet.encoder.state_dict())


def test_transunet_shapes_and_gradients_reach_encoder_and_skips() -> None:
    network = tiny_transunet()
    logits = network(torch.randn(2, 1, 64, 48))
    assert logits.shape == (2, 3, 64, 48)
    logits.square().mean().backward()
    assert network.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert network.skips[0].conv1.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (1, 1, 48, 64), (1, 64, 64)])
def test_unet_r50_rejects_bad_input(unet: ResNet50UNet, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="ResNet50UNet"):
        unet(torch.randn(shape))


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (1, 1, 40, 64), (1, 64, 64)])
def test_transunet_rejects_bad_input(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="TransUNet"):
        tiny_transunet()(torch.randn(shape))


def test_transunet_traces_to_torchscript() -> None:
    network = tiny_transunet().eval()
    x = torch.randn(1, 1, 64, 64)
    traced = torch.jit.trace(network, x)
    torch.testing.assert_close(traced(x), network(x))


def test_factory_builds_each_architecture_and_rejects_unknown() -> None:
    assert isinstance(segmentation_network("transunet", 1, 2, {"vit_img_size": 64, "vit_args": TINY_VIT}), TransUNet)
    with pytest.raises(ValueError, match="architecture must be one of"):
        segmentation_network("unet_r18", 1, 2)


def test_official_resnet_release_layout_loads_with_fc_ignored_and_conv1_summed(tmp_path: Path,
                                                                               unet: ResNet50UNet) -> None:
    """lvmmed_resnet.torch: torchvision keys (written out from the architecture, not from our module) plus fc."""
    layout = torchvision_resnet50_layout(3) | {"fc.weight": (1000, 2048), "fc.bias": (1000,)}
    state = {key: torch.randn(shape) if shape else torch.tensor(7) for key, shape in layout.items()}
    path = tmp_path / "lvmmed_resnet.torch"
    torch.save(state, path)
    load_pretrained_encoder(unet, path)
    loaded = unet.encoder.state_dict()
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(loaded["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])
    torch.testing.assert_close(loaded["bn1.running_var"], state["bn1.running_var"])


def test_bundle_export_loads_into_three_channel_unet_exactly(tmp_path: Path) -> None:
    """models/encoder_r50.pt is ResNet50Encoder.state_dict() (EncoderExport); DDP's module. prefix is removed."""
    encoder = ResNet50Encoder(3)
    path = tmp_path / "encoder_r50.pt"
    torch.save({f"module.{key}": value for key, value in encoder.state_dict().items()}, path)
    network = ResNet50UNet(in_channels=3, out_channels=2)
    load_pretrained_encoder(network, path)
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(network.encoder.state_dict()[key], value, msg=key)


def test_official_vit_release_layout_loads_into_transunet(tmp_path: Path) -> None:
    """lvmmed_vit.pth: SAM ViT-B image-encoder keys, no pos_embed; the 3-channel patch embedding is summed."""
    state = {key: torch.randn(shape) for key, shape in sam_vit_b_layout(with_pos_embed=False).items()}
    path = tmp_path / "lvmmed_vit.pth"
    torch.save(state, path)
    network = TransUNet(in_channels=1, out_channels=2)
    load_pretrained_encoder(network, path)
    loaded = network.encoder.state_dict()
    torch.testing.assert_close(loaded["patch_embed.proj.weight"],
                               state["patch_embed.proj.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(loaded["blocks.11.attn.rel_pos_h"], state["blocks.11.attn.rel_pos_h"])
    torch.testing.assert_close(loaded["neck.3.weight"], state["neck.3.weight"])


def test_whole_sam_checkpoint_keeps_its_image_encoder_only(tmp_path: Path) -> None:
    encoder = sam_vit_b(img_size=64, **TINY_VIT)
    state = {f"image_encoder.{key}": value for key, value in encoder.state_dict().items()}
    state["prompt_encoder.point_embeddings.0.weight"] = torch.randn(1, 32)
    state["mask_decoder.iou_token.weight"] = torch.randn(1, 32)
    torch.save(state, tmp_path / "sam.pth")
    network = tiny_transunet(in_channels=3)
    load_pretrained_encoder(network, tmp_path / "sam.pth")
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(network.encoder.state_dict()[key], value, msg=key)


def test_weight_file_errors_name_the_file_and_the_problem(tmp_path: Path, unet: ResNet50UNet) -> None:
    with pytest.raises(WeightFileError, match="missing.pt does not exist"):
        load_pretrained_encoder(unet, tmp_path / "missing.pt")
    vit_file = tmp_path / "vit.pth"
    torch.save(sam_vit_b(img_size=64, **TINY_VIT).state_dict(), vit_file)
    with pytest.raises(WeightFileError, match=r"vit.pth holds sam_vit encoder weights, which do not fit a resnet50"):
        load_pretrained_encoder(unet, vit_file)
    torch.save({"conv.weight": torch.randn(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(WeightFileError, match="other.pt: cannot tell the encoder kind"):
        load_pretrained_encoder(unet, tmp_path / "other.pt")
    two_channel = {key: torch.randn(shape) for key, shape in torchvision_resnet50_layout(2).items() if shape}
    torch.save(two_channel, tmp_path / "two.pt")
    with pytest.raises(WeightFileError, match="conv1.weight takes 2 input channels but the network has in_channels=1"):
        load_pretrained_encoder(unet, tmp_path / "two.pt")


def test_no_pretrained_encoder_leaves_the_network_untouched(unet: ResNet50UNet) -> None:
    before = {key: value.clone() for key, value in unet.state_dict().items()}
    assert load_pretrained_encoder(unet, None) is unet
    assert all(torch.equal(before[key], value) for key, value in unet.state_dict().items())

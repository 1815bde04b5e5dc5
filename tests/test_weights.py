"""The one pretrained-encoder loader (scripts/weights.py): every file kind, wrapper and prefix, the 3 -> 1 channel
stem, BatchNorm counters and the report, into each workflow's network, and the same steps in the converter."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from scripts.convert_weights import convert_state_dict
from scripts.networks.classifier import EncoderClassifier
from scripts.networks.medsam import build_medsam, load_medsam_weights
from scripts.networks.projector import ProjectionHead
from scripts.networks.resnet_encoder import ResNet50Encoder
from scripts.networks.sam_vit import sam_vit_b
from scripts.networks.ssl_network import LVMMedNetwork
from scripts.networks.unet_r50 import ResNet50UNet
from scripts.weights import (
    WeightFileError,
    load_encoder_weights,
    load_network_weights,
    load_pretrained_encoder,
)

TINY_VIT = {"img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,), "window_size": 4}


@pytest.fixture(scope="module")
def resnet_source() -> dict[str, torch.Tensor]:
    """A ResNet-50 state with random values everywhere (BatchNorm statistics too), so a mixed-up key is seen."""
    state = ResNet50Encoder().state_dict()
    return {key: torch.randn_like(value) if value.is_floating_point() else value + 3 for key, value in state.items()}


def _assert_encoder_equals(encoder: torch.nn.Module, source: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    own = encoder.state_dict()
    for key, value in source.items():
        if key not in skip:
            assert torch.equal(own[key], value), key


# each file kind as it is found in the wild, written from the same encoder
RESNET_FILE_KINDS = {
    "our export": lambda s: s,
    "lvmmed_resnet.torch (with fc)": lambda s: s | {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)},
    "DataParallel": lambda s: {f"module.{k}": v for k, v in s.items()},
    "training checkpoint, module.backbone.": lambda s: {
        "state_dict": {f"module.backbone.{k}": v for k, v in s.items()} | {"module.head.weight": torch.zeros(2)},
        "epoch": 7,
    },
    "whole classifier": lambda s: {f"encoder.{k}": v for k, v in s.items()} | {"head.1.weight": torch.zeros(3, 2048)},
    "before torch 0.4.1": lambda s: {k: v for k, v in s.items() if not k.endswith("num_batches_tracked")},
}


@pytest.mark.parametrize("kind", RESNET_FILE_KINDS)
def test_every_resnet_file_kind_loads_into_every_resnet_workflow(tmp_path: Path, resnet_source, kind: str) -> None:
    torch.save(RESNET_FILE_KINDS[kind](resnet_source), tmp_path / "weights.pt")
    counters = tuple(k for k in resnet_source if k.endswith("num_batches_tracked")) if "0.4.1" in kind else ()
    targets = {
        "pretraining": LVMMedNetwork(ResNet50Encoder(), ProjectionHead(2048, 8)),
        "classification / detection (the bare encoder, before wrapping)": ResNet50Encoder(),
    }
    for name, target in targets.items():
        assert load_pretrained_encoder(target, tmp_path / "weights.pt") is target, name
        _assert_encoder_equals(getattr(target, "encoder", target), resnet_source, skip=counters)


def test_a_wrapped_classifier_is_filled_through_its_encoder(tmp_path: Path, resnet_source) -> None:
    torch.save(resnet_source, tmp_path / "encoder_r50.pt")
    classifier = load_pretrained_encoder(EncoderClassifier(ResNet50Encoder(), num_classes=3), tmp_path / "encoder_r50.pt")
    _assert_encoder_equals(classifier.encoder, resnet_source)


def test_grey_segmentation_network_gets_the_summed_stem_and_the_report_says_what_was_done(
    tmp_path: Path, resnet_source, caplog: pytest.LogCaptureFixture
) -> None:
    torch.save(RESNET_FILE_KINDS["training checkpoint, module.backbone."](resnet_source), tmp_path / "ckpt.pt")
    unet = ResNet50UNet(in_channels=1, out_channels=2)
    report = load_encoder_weights(unet.encoder, tmp_path / "ckpt.pt")
    assert torch.equal(unet.encoder.conv1.weight, resnet_source["conv1.weight"].sum(dim=1, keepdim=True))
    _assert_encoder_equals(unet.encoder, resnet_source, skip=("conv1.weight",))
    text = str(report)
    assert 'unwrapped checkpoint["state_dict"] (left out: epoch)' in text
    assert 'stripped prefix "module."' in text and "dropped 1 key(s) outside it (head.)" in text
    assert "conv1.weight summed over its 3 input channels" in text
    assert len(report.loaded) == len(resnet_source)
    with caplog.at_level(logging.INFO, logger="scripts.weights"):
        load_pretrained_encoder(ResNet50UNet(in_channels=1, out_channels=2), tmp_path / "ckpt.pt")
    assert "pretrained encoder of ResNet50UNet from" in caplog.text and "summed" in caplog.text


def test_vit_files_load_into_pretraining_classification_and_prompt_segmentation(tmp_path: Path) -> None:
    """lvmmed_vit.pth (bare SAM encoder keys) and a SAM checkpoint (image_encoder. + decoder parts)."""
    source = sam_vit_b(**TINY_VIT).state_dict()
    torch.save(source, tmp_path / "lvmmed_vit.pth")
    sam = {f"image_encoder.{k}": v for k, v in source.items()} | {"mask_decoder.iou_token.weight": torch.zeros(1, 32)}
    torch.save(sam, tmp_path / "sam.pth")
    for path in (tmp_path / "lvmmed_vit.pth", tmp_path / "sam.pth"):
        pretraining = load_pretrained_encoder(LVMMedNetwork(sam_vit_b(**TINY_VIT), ProjectionHead(256, 8)), path)
        classifier = load_pretrained_encoder(sam_vit_b(**TINY_VIT), path)
        medsam = load_medsam_weights(build_medsam(64, encoder=sam_vit_b(**TINY_VIT)), encoder_weights=path)
        for encoder in (pretraining.encoder, classifier, medsam.image_encoder):
            _assert_encoder_equals(encoder, source)


def test_mismatches_are_errors_naming_the_file_and_the_fix(tmp_path: Path, resnet_source) -> None:
    torch.save(sam_vit_b(**TINY_VIT).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(WeightFileError, match="vit.pth holds sam_vit encoder weights, which do not fit a resnet50"):
        load_pretrained_encoder(ResNet50Encoder(), tmp_path / "vit.pth")
    with pytest.raises(WeightFileError, match="lacks an absolute position embedding: build the ViT with use_abs_pos=False"):
        load_pretrained_encoder(sam_vit_b(**TINY_VIT, use_abs_pos=True), tmp_path / "vit.pth")
    torch.save(resnet_source | {"extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(WeightFileError, match="1 keys not in the network: extra.weight"):
        load_pretrained_encoder(ResNet50Encoder(), tmp_path / "extra.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(WeightFileError, match="other.pt: cannot tell the encoder kind"):
        load_pretrained_encoder(ResNet50Encoder(), tmp_path / "other.pt")
    with pytest.raises(TypeError, match="encoder must be a ResNet-50 or SAM ViT encoder"):
        load_encoder_weights(torch.nn.Linear(2, 2), tmp_path / "other.pt")


def test_no_file_means_random_initialisation_and_nothing_else(resnet_source) -> None:
    encoder = ResNet50Encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert load_pretrained_encoder(encoder, None) is encoder
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_converter_and_loader_take_the_same_steps(tmp_path: Path, resnet_source) -> None:
    """A wrapped, prefixed release file: the converter's output loads strictly where the file itself loads."""
    checkpoint = RESNET_FILE_KINDS["training checkpoint, module.backbone."](resnet_source)
    converted, report = convert_state_dict(checkpoint, "release.torch")
    torch.save(checkpoint, tmp_path / "release.torch")
    direct = load_encoder_weights(ResNet50Encoder(), tmp_path / "release.torch")
    assert report.notes == direct.notes
    torch.save(converted, tmp_path / "converted.pt")
    load_network_weights(ResNet50Encoder(), tmp_path / "converted.pt")
    assert all(torch.equal(converted[k], v) for k, v in resnet_source.items())


def test_a_pretraining_checkpoint_is_an_encoder_file_for_the_converter_and_the_loader(tmp_path: Path, resnet_source) -> None:
    """runs/pretrain/checkpoints/checkpoint_N.pt: {"model": PretrainModel state, "optimizer": ...}."""
    checkpoint = {
        "model": {f"network.encoder.{k}": v for k, v in resnet_source.items()}
        | {"network.projector.0.weight": torch.zeros(8, 2048), "objective.gcn.weight": torch.zeros(8, 8)},
        "optimizer": {"state": {}, "param_groups": []},
    }
    converted, report = convert_state_dict(checkpoint, "checkpoint_280.pt")
    assert report.kind == "resnet" and 'kept the "network.encoder." entries' in str(report)
    assert all(torch.equal(converted[k], v) for k, v in resnet_source.items())
    torch.save(checkpoint, tmp_path / "checkpoint_280.pt")
    _assert_encoder_equals(load_pretrained_encoder(ResNet50Encoder(), tmp_path / "checkpoint_280.pt"), resnet_source)


TRAINING_CONFIGS = ["pretrain.json", "train.json", "train_cls.json", "train_det.json", "train_prompt_seg.json"]


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_every_training_config_has_one_pretrained_encoder_setting_defaulting_to_random_init(name: str) -> None:
    config = json.loads((REPO_ROOT / "configs" / name).read_text())
    assert config["pretrained_encoder"] is None
    assert not {"pretrained_weights", "init_weights", "encoder_weights", "pretrained_kind"} & set(config)
    text = json.dumps(config)
    assert "load_pretrained_encoder(" in text or "load_medsam_weights(@medsam, @sam_checkpoint, @pretrained_encoder)" in text
    assert "encoder_r50.pt') if os.path.isfile" not in text  # no silent pick-up of a file that happens to exist

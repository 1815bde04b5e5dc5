"""Detection pieces: the torchvision-free ResNet-FPN backbone, the ATSS RetinaNet detector, mAP, box order."""

from __future__ import annotations

import sys

import pytest
import torch

from scripts.detection.backbone import ResNetFPNBackbone
from scripts.detection.detector import build_retinanet_detector
from scripts.detection.engine import BoxesToArrayOrderd, DetectionMAP, array_order_to_image_boxes
from scripts.networks.resnet_encoder import ResNet50Encoder


def test_backbone_levels_strides_and_encoder_keys() -> None:
    backbone = ResNetFPNBackbone(ResNet50Encoder(), returned_layers=(2, 3), out_channels=16).eval()
    levels = backbone(torch.randn(1, 3, 64, 64))
    assert {key: tuple(value.shape) for key, value in levels.items()} == {
        "0": (1, 16, 8, 8), "1": (1, 16, 4, 4), "pool": (1, 16, 2, 2)}
    assert set(ResNet50Encoder().state_dict()) == {k[len("encoder."):] for k in backbone.state_dict() if k.startswith("encoder.")}
    assert "torchvision" not in sys.modules


def test_trainable_layers_and_frozen_batchnorm() -> None:
    backbone = ResNetFPNBackbone(ResNet50Encoder(), returned_layers=(1, 2, 3), out_channels=8, trainable_layers=2,
                                 freeze_batchnorm=True)
    trainable = {name.split(".")[1] for name, p in backbone.named_parameters() if p.requires_grad and name.startswith("encoder.")}
    assert trainable == {"layer3"}  # layer4 is trainable but unused (beyond the deepest returned stage)
    assert not backbone.encoder.layer3[0].bn1.weight.requires_grad
    before = backbone.encoder.layer1[0].bn1.running_mean.clone()
    backbone.train()(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, backbone.encoder.layer1[0].bn1.running_mean)
    assert all(p.requires_grad for p in backbone.fpn.parameters())


@pytest.mark.parametrize("bad", [dict(returned_layers=(0, 1)), dict(returned_layers=(1, 1)), dict(trainable_layers=6)])
def test_backbone_rejects_bad_arguments(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        ResNetFPNBackbone(ResNet50Encoder(), **bad)


def test_detector_trains_with_atss_and_predicts_without_torchvision() -> None:
    detector = build_retinanet_detector(ResNetFPNBackbone(ResNet50Encoder(), returned_layers=(1, 2), out_channels=16), 2)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"box": torch.tensor([[10.0, 12.0, 30.0, 28.0]]), "label": torch.tensor([1])},
               {"box": torch.zeros(0, 4), "label": torch.zeros(0, dtype=torch.long)}]
    detector.train()
    losses = detector(images, targets)
    assert set(losses) == {"classification", "box_regression"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert detector.network.classification_head.cls_logits.weight.grad is not None
    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == 2 and set(detections[0]) == {"box", "label", "label_scores"}
    assert "torchvision" not in sys.modules


def test_map_is_one_for_perfect_zero_for_none_and_between_for_half() -> None:
    metric = DetectionMAP(["lesion"])
    targets = [{"box": torch.tensor([[10.0, 10, 20, 20], [30, 30, 40, 44]]), "label": torch.tensor([0, 0])}]

    def score(boxes: list, scores: list) -> float:
        metric.reset()
        metric.update(([{"box": torch.tensor(boxes).reshape(-1, 4), "label": torch.zeros(len(scores), dtype=torch.long),
                         "label_scores": torch.tensor(scores)}], targets))
        return metric.compute()

    assert score([[10.0, 10, 20, 20], [30, 30, 40, 44]], [0.9, 0.8]) == pytest.approx(1.0)
    assert score([], []) == 0.0
    assert 0.3 < score([[10.0, 10, 20, 20], [0, 0, 5, 5]], [0.9, 0.8]) < 0.7
    assert score([[11.0, 11, 21, 21]], [0.9]) > 0  # IoU 0.68 >= 0.5
    assert score([[14.0, 14, 24, 24]], [0.9]) == 0  # IoU 0.22 < 0.5
    with pytest.raises(ValueError, match="one target per prediction"):
        metric.update(([], targets))


def test_boxes_go_to_array_order_and_back() -> None:
    sample = BoxesToArrayOrderd("box")({"box": [[1, 2, 5, 9]], "label": [0]})
    assert sample["box"].tolist() == [[2.0, 1.0, 9.0, 5.0]] and sample["label"].dtype == torch.long
    assert array_order_to_image_boxes(sample["box"]).tolist() == [[1.0, 2.0, 5.0, 9.0]]
    empty = BoxesToArrayOrderd("box")({"box": [], "label": []})
    assert empty["box"].shape == (0, 4) and empty["label"].shape == (0,)

"""ONNX export (scripts/onnx_export.py): onnxruntime on CPU gives torch's outputs within 1e-4 at another batch size
than the export's (dynamic batch), for the encoders and every inference network; small inputs keep it fast."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from conftest import REPO_ROOT
from scripts.detection.backbone import ResNetFPNBackbone
from scripts.detection.detector import build_retinanet_detector
from scripts.networks.classifier import EncoderClassifier
from scripts.networks.medsam import build_medsam
from scripts.networks.resnet_encoder import ResNet50Encoder
from scripts.networks.sam_vit import sam_vit_b
from scripts.networks.transunet import TransUNet
from scripts.networks.unet_r50 import ResNet50UNet
from scripts.onnx_export import check_with_onnxruntime, export_onnx, export_spec, main

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,), "window_size": 4}
TOLERANCE = 1e-4

# name -> (network builder, example image shape, whether it takes boxes, expected output names)
SMALL_NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool, tuple[str, ...]]] = {
    "ViT encoder": (lambda: sam_vit_b(img_size=64, **TINY_VIT), (2, 3, 64, 64), False, ("feature_map", "pooled")),
    "TransUNet": (lambda: TransUNet(1, 3, vit_img_size=64, vit_args=TINY_VIT, skip_channels=(4, 8, 8, 16)),
                  (2, 1, 64, 64), False, ("logits",)),
    "classifier": (lambda: EncoderClassifier(sam_vit_b(img_size=64, **TINY_VIT), 3), (2, 3, 64, 64), False, ("logits",)),
    "MedSAM": (lambda: build_medsam(64, encoder=sam_vit_b(img_size=64, **TINY_VIT)), (2, 3, 64, 64), True, ("logits",)),
}
RESNET_NETWORKS = {
    "ResNet-50 encoder": (lambda: ResNet50Encoder(1), (2, 1, 64, 64), False, ("feature_map", "pooled")),
    "U-Net ResNet-50": (lambda: ResNet50UNet(1, 3), (2, 1, 64, 64), False, ("logits",)),
    "RetinaNet": (lambda: build_retinanet_detector(ResNetFPNBackbone(ResNet50Encoder(), returned_layers=(1, 2)), 2),
                  (2, 3, 64, 64), False, ("classification_0", "classification_1", "classification_2",
                                          "box_regression_0", "box_regression_1", "box_regression_2")),
}


def _export_and_check(tmp_path: Path, name: str, table: dict, dynamo: bool = False) -> None:
    build, shape, boxes, outputs = table[name]
    spec = export_spec(build(), shape, boxes=boxes)
    assert spec.output_names == outputs
    path = export_onnx(spec, tmp_path / "network.onnx", dynamo=dynamo)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == list(spec.input_names)
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in (*graph.input, *graph.output)), "batch not dynamic"
    for batch_size in (1, 3):
        check = check_with_onnxruntime(spec, path, batch_size=batch_size)
        assert check.max_abs_output > 0
        assert check.max_abs_difference <= TOLERANCE * max(1.0, check.max_abs_output), str(check)


@pytest.mark.parametrize("name", SMALL_NETWORKS)
def test_small_networks_match_torch_in_onnxruntime_at_any_batch(tmp_path: Path, name: str) -> None:
    _export_and_check(tmp_path, name, SMALL_NETWORKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", RESNET_NETWORKS)
def test_resnet_networks_match_torch_in_onnxruntime_at_any_batch(tmp_path: Path, name: str) -> None:
    _export_and_check(tmp_path, name, RESNET_NETWORKS)


@pytest.mark.slow
def test_the_torch_export_based_exporter_gives_the_same_encoder(tmp_path: Path) -> None:
    _export_and_check(tmp_path, "ViT encoder", SMALL_NETWORKS, dynamo=True)


def test_command_exports_the_inference_config_network_with_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``python -m scripts.onnx_export --config_file configs/inference.json`` loads the config's checkpoint (here a
    small TransUNet's, given by the same overrides as ``monai.bundle run``) and checks the graph before success."""
    options = {"vit_img_size": 64, "vit_args": TINY_VIT, "skip_channels": [4, 8, 8, 16]}
    network = TransUNet(1, 3, **options)
    torch.save(network.state_dict(), tmp_path / "model.pt")
    monkeypatch.chdir(REPO_ROOT)
    arguments = ["--config_file", "configs/inference.json", "--filepath", str(tmp_path / "model.onnx"),
                 "--architecture", "transunet", "--network_options", repr(options), "--image_size", "64"]
    assert main([*arguments, "--checkpoint", str(tmp_path / "model.pt")]) == 0
    output = capsys.readouterr().out
    assert "exported network_def of configs/inference.json" in output and "dynamic batch" in output
    spec = export_spec(network, (2, 1, 64, 64))
    assert check_with_onnxruntime(spec, tmp_path / "model.onnx").max_abs_difference <= TOLERANCE
    assert main([*arguments, "--checkpoint", str(tmp_path / "absent.pt")]) == 1
    assert "absent.pt does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_command_runs_as_a_module(tmp_path: Path) -> None:
    torch.save(ResNet50Encoder().state_dict(), tmp_path / "encoder_r50.pt")
    command = [sys.executable, "-m", "scripts.onnx_export", "--config_file", "configs/pretrain.json",
               "--net_id", "network_def#encoder", "--ckpt_file", str(tmp_path / "encoder_r50.pt"),
               "--filepath", str(tmp_path / "encoder_r50.onnx"), "--input_shape", "2", "3", "64", "64"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "outputs feature_map, pooled; dynamic batch" in result.stdout


def test_tensorrt_overlay_runs_the_inference_config_and_falls_back_to_torch_without_a_gpu(tmp_path: Path) -> None:
    """configs/inference_trt.json over configs/inference.json: MONAI's trt_compile builds a TensorRT engine on the
    first batch when CUDA, TensorRT and polygraphy are present; here (CPU) it leaves the torch network in place, so
    the overlay must still give the same masks as inference.json alone."""
    from monai.bundle import ConfigWorkflow

    from scripts.segmentation.embedded import prepare_segmentation_data

    options = {"vit_img_size": 32, "vit_args": {"embed_dim": 16, "depth": 1, "num_heads": 2, "global_attn_indexes": [0],
                                                  "window_size": 2}, "skip_channels": [4, 4, 4, 4]}
    torch.save(TransUNet(1, 3, **options).state_dict(), tmp_path / "model.pt")
    images = Path(prepare_segmentation_data(tmp_path / "data")) / "imagesTs"
    first = sorted(images.iterdir())[0]
    masks = {}
    for name, files in {"torch": ["inference.json"], "trt": ["inference.json", "inference_trt.json"]}.items():
        flow = ConfigWorkflow(config_file=[str(REPO_ROOT / "configs" / f) for f in files], workflow_type="infer",
                              datalist=[{"image": str(first)}], checkpoint=str(tmp_path / "model.pt"),
                              architecture="transunet", network_options=options, image_size=32,
                              output_dir=str(tmp_path / name), bundle_root=str(tmp_path))
        flow.initialize()
        flow.run()
        flow.finalize()
        (written,) = (tmp_path / name).glob(f"{first.name.split('.')[0]}_seg.*")
        masks[name] = written.read_bytes()
    assert masks["trt"] == masks["torch"]

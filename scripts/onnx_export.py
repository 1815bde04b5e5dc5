"""ONNX export of the bundle's encoders and inference networks, checked against onnxruntime.

MONAI's ``python -m monai.bundle onnx_export`` serves the networks of one image input and one tensor output (the
segmentation and classification networks; see docs/interoperability.md). This command covers every inference
network of the bundle, including those MONAI's command cannot take: the encoders (two outputs: feature map and
pooled vector), MedSAM (two inputs: images and boxes) and the RetinaNet of detection (a dict of per-level head
outputs; anchors, box decoding and NMS stay in torch, as in MONAI's ``RetinaNetDetector``). The batch dimension of
every input and output is dynamic, and the exported graph is run with onnxruntime on CPU on a random batch of
another size and compared with torch before the command reports success.

Usage::

    python -m scripts.onnx_export --config_file configs/inference.json --filepath models/model.onnx
    python -m scripts.onnx_export --config_file configs/inference_cls.json --filepath models/classifier.onnx
    python -m scripts.onnx_export --config_file configs/inference_det.json --filepath models/detector.onnx
    python -m scripts.onnx_export --config_file configs/inference_prompt_seg.json --filepath models/medsam.onnx
    python -m scripts.onnx_export --config_file configs/pretrain.json --net_id network_def#encoder \\
        --filepath models/encoder_r50.onnx --ckpt_file models/encoder_r50.pt

``--net_id`` defaults to each config's trained network and ``--ckpt_file`` to the weights that config loads; the
image size, channels and classes come from the settings stored beside those weights (``scripts.model_settings``),
as in the inference configs. Any other ``--key value`` overrides the config as with ``python -m monai.bundle run``;
one that contradicts the stored settings is warned about.
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from torch import nn

from scripts.model_settings import read_settings, warn_contradictions
from scripts.weights import WeightFileError, load_network_weights

__all__ = ["ExportSpec", "OnnxCheck", "check_with_onnxruntime", "export_onnx", "export_spec", "main"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ExportSpec:
    """What to export from a network: the module, example inputs (batch first) and the graph's names."""

    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


@dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime (CPU) against torch on one random batch: its size and the largest absolute difference."""

    batch_size: int
    max_abs_difference: float
    max_abs_output: float

    def __str__(self) -> str:
        return (f"onnxruntime vs torch at batch {self.batch_size}: max |difference| {self.max_abs_difference:.2e} "
                f"(outputs up to {self.max_abs_output:.2e})")


class _FlatOutputs(nn.Module):
    """Runs ``network`` and returns its outputs as a flat tuple of tensors (ONNX outputs are a flat list): a dict of
    lists (MONAI's RetinaNet head outputs) becomes ``classification_0, ..., box_regression_0, ...``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_flatten(self.network(*inputs)))


def _flatten(output: Any) -> list[torch.Tensor]:
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, dict):
        return [tensor for key in output for tensor in _flatten(output[key])]
    if isinstance(output, (list, tuple)):
        return [tensor for item in output for tensor in _flatten(item)]
    raise TypeError(f"network outputs must be tensors or dicts/lists/tuples of them, got {type(output).__name__}.")


def _output_names(output: Any, prefix: str = "output") -> list[str]:
    if torch.is_tensor(output):
        return [prefix]
    if isinstance(output, dict):
        return [name for key in output for name in _output_names(output[key], str(key))]
    return [name for i, item in enumerate(output) for name in _output_names(item, f"{prefix}_{i}")]


def export_spec(network: nn.Module, image_shape: Sequence[int], *, boxes: bool = False) -> ExportSpec:
    """The export of ``network`` for images of ``image_shape`` (batch first): the network itself, or, for a
    MONAI detector (``RetinaNetDetector``), its ``network`` (the RetinaNet); ``boxes`` adds a (batch, 4) box input
    in pixels (MedSAM). Output names come from the outputs' structure (encoders: ``feature_map``, ``pooled``)."""
    if len(image_shape) < 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (batch, channels, *spatial) with positive sizes, got {list(image_shape)}.")
    module = getattr(network, "network", network) if type(network).__name__.endswith("Detector") else network
    images = torch.rand(*image_shape)
    inputs: tuple[torch.Tensor, ...] = (images,)
    input_names: tuple[str, ...] = ("image",)
    if boxes:
        side = float(min(image_shape[2:]))
        corner = torch.rand(image_shape[0], 2) * side / 2
        inputs, input_names = (images, torch.cat([corner, corner + side / 4], dim=1)), ("image", "boxes")
    module = module.eval()
    with torch.no_grad():
        output = module(*inputs)
    if isinstance(output, tuple) and len(output) == 2 and all(torch.is_tensor(o) for o in output) and output[1].ndim == 2:
        names = ["feature_map", "pooled"]  # this bundle's encoders: (N, C, h, w) map and its (N, C) mean
    elif torch.is_tensor(output):
        names = ["logits"]
    else:
        names = _output_names(output)
    return ExportSpec(_FlatOutputs(module), inputs, input_names, tuple(names))


def export_onnx(spec: ExportSpec, path: str | Path, *, opset_version: int = DEFAULT_OPSET, dynamo: bool = False) -> Path:
    """Writes ``spec.module`` as ONNX with a dynamic batch dimension on every input and output.

    Args:
        spec: from :func:`export_spec`.
        path: the ``.onnx`` file to write (its folder is created).
        opset_version: ONNX opset (18 by default; TensorRT 8.6+ and onnxruntime 1.14+ read it).
        dynamo: use torch's ``torch.export``-based exporter (torch's default since 2.9) instead of the
            TorchScript-based one. The default is the TorchScript one: it exports every network here with a
            dynamic batch, in about a fifth of the time (1.6 s vs 21 s for a small ViT on one CPU core), whereas
            ``torch.export`` fixes MedSAM's batch (its boxes input takes (B, 4) or, for B = 1, (K, 4)).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {name: {0: "batch"} for name in (*spec.input_names, *spec.output_names)}
    options: dict[str, Any]
    if dynamo:
        dim = torch.export.Dim("batch", min=1, max=1024)
        # one entry for the wrapper's *inputs, holding one shape spec per input
        options = {"dynamic_shapes": (tuple({0: dim} for _ in spec.inputs),), "optimize": True}
    else:
        options = {"dynamic_axes": batch}
    with torch.no_grad():
        torch.onnx.export(spec.module.eval(), spec.inputs, str(path), input_names=list(spec.input_names),
                          output_names=list(spec.output_names), opset_version=opset_version, dynamo=dynamo, **options)
    return path


def check_with_onnxruntime(spec: ExportSpec, path: str | Path, batch_size: int = 3) -> OnnxCheck:
    """Runs the exported graph with onnxruntime on CPU on random inputs of ``batch_size`` (another size than the
    export's, to exercise the dynamic batch) and compares every output with torch."""
    import onnxruntime  # optional dependency of the export only

    inputs = tuple(_resized_batch(tensor, batch_size) for tensor in spec.inputs)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = session.run(list(spec.output_names), {name: t.numpy() for name, t in zip(spec.input_names, inputs)})
    with torch.no_grad():
        expected = spec.module.eval()(*inputs)
    if len(results) != len(expected):
        raise RuntimeError(f"{path} has {len(results)} outputs, torch gives {len(expected)}")
    differences = [float(np.max(np.abs(r - e.numpy()))) for r, e in zip(results, expected)]
    largest = max(float(e.abs().max()) for e in expected)
    return OnnxCheck(batch_size, max(differences), largest)


def _resized_batch(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A random tensor like ``tensor`` (same value range) with ``batch_size`` rows."""
    low, high = float(tensor.min()), float(tensor.max())
    return low + (high - low) * torch.rand(batch_size, *tensor.shape[1:])


# config file name -> (network id, config key of its weights file (whose stored settings the config reads), whether
# the network id loads the weights itself (else they are loaded here), whether the network takes boxes)
_CONFIG_NETWORKS = {
    "inference.json": ("network_def", "checkpoint", False, False),
    "evaluate.json": ("network_def", "checkpoint", False, False),
    "inference_cls.json": ("trained_network", "model_path", True, False),
    "inference_det.json": ("trained_network", "model_path", True, False),
    "inference_prompt_seg.json": ("trained_network", "model_path", True, True),
}


def _image_shape(parser: ConfigParser, network: nn.Module) -> list[int]:
    """(2, channels, size, size) from the config's ``image_size`` and the network's input channels."""
    size = parser.get_parsed_content("image_size") if "image_size" in parser else 64
    for name in ("in_channels", "in_chans"):
        if isinstance(getattr(network, name, None), int):
            return [2, getattr(network, name), size, size]
    encoder = getattr(network, "encoder", None) or getattr(network, "image_encoder", None)
    if encoder is None and hasattr(network, "network"):  # detector -> RetinaNet -> feature extractor -> encoder
        encoder = getattr(getattr(network.network, "feature_extractor", None), "encoder", None)
    channels = next((getattr(encoder, n) for n in ("in_channels", "in_chans") if isinstance(getattr(encoder, n, None), int)), 3)
    return [2, channels, size, size]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.onnx_export", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--config_file", required=True, type=Path, help="an inference config, or pretrain.json")
    parser.add_argument("--filepath", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--net_id", default=None, help="network id in the config (default: its trained network)")
    parser.add_argument("--ckpt_file", default=None, type=Path, help="plain state dict to load into the network")
    parser.add_argument("--input_shape", default=None, type=int, nargs="+",
                        help="example image shape, batch first (default: 2, channels, image_size, image_size)")
    parser.add_argument("--opset", default=DEFAULT_OPSET, type=int)
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                        help="torch's TorchScript-based exporter (default) or its torch.export-based one")
    parser.add_argument("--tolerance", default=1e-4, type=float, help="largest accepted |onnxruntime - torch|")
    args, overrides = parser.parse_known_args(argv)
    if len(overrides) % 2:
        parser.error(f"config overrides come in --key value pairs, got {overrides}")
    config = ConfigParser()
    config.read_config(str(args.config_file))
    for key, value in zip(overrides[::2], overrides[1::2]):
        config[key.lstrip("-")] = _parse_value(value)
    net_id, weights_key, loaded_by_network, boxes = _CONFIG_NETWORKS.get(args.config_file.name,
                                                                         ("network_def", None, False, False))
    ckpt_file = args.ckpt_file
    if args.net_id is None and weights_key is not None:
        if ckpt_file is not None:
            # the config reads the settings stored beside its weights file: those of the exported weights
            config[weights_key] = str(ckpt_file)
            ckpt_file = None if loaded_by_network else ckpt_file
        elif not loaded_by_network:
            ckpt_file = config.get_parsed_content(weights_key)
        weights = config.get_parsed_content(weights_key)
        given = {key.lstrip("-"): _parse_value(value) for key, value in zip(overrides[::2], overrides[1::2])}
        warn_contradictions(weights, read_settings(weights), **given)
    net_id = args.net_id or net_id
    try:
        network = config.get_parsed_content(net_id)
        if ckpt_file is not None:
            network = load_network_weights(network, ckpt_file)
    except WeightFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    shape = args.input_shape or _image_shape(config, network)
    spec = export_spec(network.cpu(), shape, boxes=boxes)
    export_onnx(spec, args.filepath, opset_version=args.opset, dynamo=args.exporter == "dynamo")
    check = check_with_onnxruntime(spec, args.filepath, batch_size=shape[0] + 1)
    tolerance = args.tolerance * max(1.0, check.max_abs_output)
    print(f"exported {net_id} of {args.config_file} to {args.filepath} (inputs {', '.join(spec.input_names)}; "
          f"outputs {', '.join(spec.output_names)}; dynamic batch)\n{check}")
    if check.max_abs_difference > tolerance:
        print(f"error: the difference exceeds {tolerance:.2e}", file=sys.stderr)
        return 1
    return 0


def _parse_value(text: str) -> Any:
    """A command-line value as MONAI's bundle CLI reads it (Python literals; anything else stays a string)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


if __name__ == "__main__":
    sys.exit(main())

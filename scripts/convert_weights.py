"""Converts the official LVM-Med and SAM weight files into the plain state dicts this bundle's networks load.

Sources (Nguyen et al., "LVM-Med: Learning Large-Scale Self-Supervised Vision Models for Medical Imaging via
Second-order Graph Matching", NeurIPS 2023; Kirillov et al., "Segment Anything", ICCV 2023):

* ``lvmmed_resnet.torch``: torchvision ResNet-50 keys, possibly with the ``fc.*`` classifier, possibly wrapped in
  ``{"state_dict": ...}`` / ``{"model": ...}`` and prefixed ``module.`` (DataParallel) or ``backbone.``;
  target :class:`scripts.networks.resnet_encoder.ResNet50Encoder`.
* ``lvmmed_vit.pth``: SAM image-encoder keys without ``pos_embed``; target
  :func:`scripts.networks.sam_vit.sam_vit_b` (``use_abs_pos=False``).
* ``sam_vit_b_01ec64.pth``: ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``; the image encoder is
  checked against ``sam_vit_b(use_abs_pos=True)``, the prompt encoder and mask decoder against this bundle's
  modules of the same layout.

Every file is read with ``torch.load(weights_only=True)``: nothing in it is executed. Every tensor is checked
against the target network's names and shapes with :func:`scripts.weights.load_weights`; the output is the
network's own ``state_dict()`` after loading, written atomically.

Usage::

    python -m scripts.convert_weights --src lvmmed_resnet.torch --dst models/lvmmed_resnet.pt
    python -m scripts.convert_weights --src lvmmed_vit.pth --dst models/lvmmed_vit.pt --kind vit
    python -m scripts.convert_weights --src sam_vit_b_01ec64.pth --dst models/sam_vit_b.pt --kind sam
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from scripts.atomic_save import save_atomically
from scripts.networks.resnet_encoder import ResNet50Encoder
from scripts.networks.sam_vit import sam_vit_b
from scripts.weights import LoadReport, WeightFileError, load_weights, read_checkpoint, select_prefix

__all__ = [
    "KINDS",
    "ConversionReport",
    "unwrap_state_dict",
    "strip_prefixes",
    "guess_kind",
    "convert_state_dict",
    "convert_file",
    "main",
]

KINDS = ("resnet", "vit", "sam")
# Entries of a training checkpoint that hold the network's weights, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model")
# Prefixes added by torch.nn.DataParallel / DistributedDataParallel and by self-supervised training wrappers.
_PARALLEL_PREFIX = "module."
_BACKBONE_PREFIX = "backbone."
_SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_PATCH_SIZE = 16  # SAM ViT-B patch side: the image size follows from the global blocks' relative positions


@dataclass
class ConversionReport:
    """What :func:`convert_state_dict` changed (``notes``) and how each part loaded (``parts``)."""

    kind: str
    notes: list[str] = field(default_factory=list)
    parts: dict[str, LoadReport] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"kind: {self.kind}", *(f"- {note}" for note in self.notes)]
        for name, report in self.parts.items():
            lines.append(f"{name}: {report}")
            if report.missing:
                lines.append(f"  missing (left as initialised): {', '.join(report.missing)}")
            if report.unexpected:
                lines.append(f"  unexpected (not written): {', '.join(report.unexpected)}")
        return "\n".join(lines)


def _tensor_entries(mapping: Mapping) -> tuple[list[str], list[str]]:
    """Names of the tensor entries and of the other entries of ``mapping``."""
    tensors = [k for k, v in mapping.items() if isinstance(k, str) and torch.is_tensor(v)]
    others = [str(k) for k, v in mapping.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    return tensors, others


def unwrap_state_dict(checkpoint: object, source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Finds the flat ``{name: tensor}`` mapping in a loaded checkpoint.

    A training checkpoint ``{"state_dict": {...}, "epoch": ..., "optimizer": ...}`` (or with ``"model"``) is
    unwrapped, nested wrappers too; the entries left out are named in the returned notes.

    Raises:
        WeightFileError: ``checkpoint`` is not a mapping, or holds non-tensor entries and no known wrapper.
    """
    notes: list[str] = []
    current = checkpoint
    path = ""
    while True:
        if not isinstance(current, Mapping):
            raise WeightFileError(f"{source}{path} holds a {type(current).__name__}, not a state dict")
        tensors, others = _tensor_entries(current)
        if tensors and not others:
            return {k: current[k] for k in tensors}, notes
        wrapper = next((key for key in _WRAPPER_KEYS if isinstance(current.get(key), Mapping)), None)
        if wrapper is None:
            shown = ", ".join(others[:8]) if tensors else ", ".join(map(str, list(current)[:8]))
            raise WeightFileError(
                f"{source}{path} is not a state dict of name -> tensor and has no "
                f"{' or '.join(repr(k) for k in _WRAPPER_KEYS)} entry holding one; its entries include: {shown}"
            )
        left_out = sorted(str(key) for key in current if key != wrapper)
        notes.append(
            f'unwrapped checkpoint{path}["{wrapper}"]'
            + (f" (left out: {', '.join(left_out)})" if left_out else "")
        )
        path += f'["{wrapper}"]'
        current = current[wrapper]


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Removes the ``module.`` prefix (when every key has it) and keeps only the ``backbone.`` entries (when any
    key has that prefix), repeatedly, so ``module.backbone.`` is handled too.

    Returns:
        the renamed state and one note per change, naming what was stripped and what was dropped.
    """
    notes: list[str] = []
    state = dict(state)
    while True:
        if state and all(key.startswith(_PARALLEL_PREFIX) for key in state):
            state = select_prefix(state, _PARALLEL_PREFIX)
            notes.append(f'stripped prefix "{_PARALLEL_PREFIX}" from all {len(state)} keys')
        elif any(key.startswith(_BACKBONE_PREFIX) for key in state):
            others = sorted({key.split(".")[0] + "." for key in state if not key.startswith(_BACKBONE_PREFIX)})
            dropped = sum(not key.startswith(_BACKBONE_PREFIX) for key in state)
            state = select_prefix(state, _BACKBONE_PREFIX)
            notes.append(
                f'stripped prefix "{_BACKBONE_PREFIX}" from {len(state)} keys'
                + (f"; dropped {dropped} key(s) outside it ({', '.join(others)})" if dropped else "")
            )
        else:
            return state, notes


def guess_kind(state: Mapping[str, torch.Tensor]) -> str:
    """``"sam"``, ``"vit"`` or ``"resnet"`` from the key names (after unwrapping and prefix stripping).

    Raises:
        WeightFileError: the keys match none of the three layouts.
    """
    if any(key.startswith("mask_decoder.") for key in state) and any(key.startswith("image_encoder.") for key in state):
        return "sam"
    if "patch_embed.proj.weight" in state or "image_encoder.patch_embed.proj.weight" in state:
        return "vit"
    if "layer1.0.conv1.weight" in state:
        return "resnet"
    raise WeightFileError(
        "cannot tell the layout of the weights (no layer1.0.conv1.weight, patch_embed.proj.weight or "
        f"image_encoder./mask_decoder. keys; first keys: {', '.join(list(state)[:5])}); pass --kind"
    )


def _load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> tuple[dict, LoadReport]:
    """Loads ``state`` into ``module`` (names and shapes must match exactly) and returns the module's state."""
    report = load_weights(module, state, source=source)
    return module.state_dict(), report


def _convert_resnet(state: dict[str, torch.Tensor], source: str, report: ConversionReport) -> dict:
    head = sorted(key for key in state if key.startswith("fc."))
    if head:
        report.notes.append(f"dropped {', '.join(head)} (classifier head; the encoder ends at global pooling)")
        state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    encoder = ResNet50Encoder()
    counters = [key for key in encoder.state_dict() if key.endswith("num_batches_tracked") and key not in state]
    if counters and any(key.endswith("running_mean") for key in state):
        # Files saved before torch 0.4.1 lack the batch-norm step counters; they only matter for momentum=None.
        state = {**state, **{key: torch.tensor(0, dtype=torch.long) for key in counters}}
        report.notes.append(f"filled {len(counters)} missing batch-norm num_batches_tracked counters with 0")
    converted, report.parts["encoder"] = _load_checked(encoder, state, source)
    return converted


def _vit_image_size(state: Mapping[str, torch.Tensor], source: str) -> int:
    """The training image side of a SAM ViT-B state: from ``pos_embed`` (1, g, g, C) or, without it, from the
    largest relative-position table (2 g - 1, head_dim) of the global-attention blocks."""
    if "pos_embed" in state:
        return int(state["pos_embed"].shape[1]) * _PATCH_SIZE
    tables = [value.shape[0] for key, value in state.items() if key.endswith("attn.rel_pos_h")]
    if not tables:
        raise WeightFileError(f"{source} has neither pos_embed nor attn.rel_pos_h tables: not a SAM ViT encoder")
    return (max(tables) + 1) // 2 * _PATCH_SIZE


def _convert_vit(state: dict[str, torch.Tensor], source: str, report: ConversionReport) -> dict:
    if any(key.startswith("image_encoder.") for key in state):
        others = sorted({key.split(".")[0] + "." for key in state if not key.startswith("image_encoder.")})
        state = select_prefix(state, "image_encoder.")
        report.notes.append(
            'kept the "image_encoder." entries without their prefix'
            + (f"; dropped {', '.join(others)}" if others else "")
        )
    use_abs_pos = "pos_embed" in state
    img_size = _vit_image_size(state, source)
    report.notes.append(
        f"image encoder for {img_size}x{img_size} images, "
        + ("with pos_embed: build it with use_abs_pos=True" if use_abs_pos else "without pos_embed (use_abs_pos=False)")
    )
    converted, report.parts["image_encoder"] = _load_checked(
        sam_vit_b(img_size=img_size, use_abs_pos=use_abs_pos), state, source
    )
    return converted


def _optional_module(module_name: str, class_name: str) -> Callable[[], nn.Module] | None:
    """The class ``module_name.class_name`` if this bundle has it, else None."""
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None


def _convert_sam(state: dict[str, torch.Tensor], source: str, report: ConversionReport) -> dict:
    outside = sorted(key for key in state if not key.startswith(_SAM_PARTS))
    if outside:
        raise WeightFileError(
            f"{source} has {len(outside)} keys outside {', '.join(_SAM_PARTS)}: {', '.join(outside[:10])}"
        )
    converted: dict[str, torch.Tensor] = {}
    image_encoder = select_prefix(state, "image_encoder.")
    if not image_encoder:
        raise WeightFileError(f"{source} has no image_encoder.* keys")
    image_report = ConversionReport(kind="vit")
    encoder_state = _convert_vit(image_encoder, source, image_report)
    report.notes.extend(image_report.notes)
    report.parts.update(image_report.parts)
    converted.update({f"image_encoder.{key}": value for key, value in encoder_state.items()})
    builders = {
        "prompt_encoder": _optional_module("scripts.networks.sam_prompt_encoder", "SamPromptEncoder"),
        "mask_decoder": _optional_module("scripts.networks.sam_mask_decoder", "SamMaskDecoder"),
    }
    for part, builder in builders.items():
        part_state = select_prefix(state, f"{part}.")
        if not part_state:
            raise WeightFileError(f"{source} has no {part}.* keys")
        if builder is None:
            report.notes.append(f"{part}: {len(part_state)} tensors copied unchecked (no {part} module in this bundle)")
        else:
            part_state, report.parts[part] = _load_checked(builder(), part_state, source)
        converted.update({f"{part}.{key}": value for key, value in part_state.items()})
    return converted


_CONVERTERS = {"resnet": _convert_resnet, "vit": _convert_vit, "sam": _convert_sam}


def convert_state_dict(
    checkpoint: object, source: str, kind: str | None = None
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Converts a loaded checkpoint into the state dict of this bundle's network of ``kind``.

    Args:
        checkpoint: what ``torch.load(weights_only=True)`` returned.
        source: the file name, used in messages.
        kind: ``"resnet"``, ``"vit"`` or ``"sam"``; guessed from the key names when None.

    Returns:
        the network's state dict after loading (names and shapes checked) and a report of every change.

    Raises:
        WeightFileError: not a state dict, an unknown layout, or names/shapes that do not fit the network.
        ValueError: ``kind`` is not one of :data:`KINDS`.

    Example::

        state, report = convert_state_dict(torch.load("lvmmed_resnet.torch", weights_only=True), "lvmmed_resnet.torch")
        print(report)
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    state, unwrap_notes = unwrap_state_dict(checkpoint, source)
    state, prefix_notes = strip_prefixes(state)
    kind = kind or guess_kind(state)
    report = ConversionReport(kind=kind, notes=unwrap_notes + prefix_notes)
    converted = _CONVERTERS[kind](state, source, report)
    return converted, report


def convert_file(src: str | Path, dst: str | Path, kind: str | None = None) -> ConversionReport:
    """Reads ``src`` safely, converts it (see :func:`convert_state_dict`) and writes ``dst`` atomically."""
    converted, report = convert_state_dict(read_checkpoint(src), str(src), kind)
    save_atomically(converted, dst)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.convert_weights",
        description="Convert official LVM-Med / SAM weight files into this bundle's plain state dicts.",
    )
    parser.add_argument("--src", required=True, type=Path, help="lvmmed_resnet.torch, lvmmed_vit.pth or a SAM .pth")
    parser.add_argument("--dst", required=True, type=Path, help="output file, e.g. models/lvmmed_resnet.pt")
    parser.add_argument("--kind", choices=KINDS, default=None, help="layout of --src (default: from its keys)")
    args = parser.parse_args(argv)
    try:
        report = convert_file(args.src, args.dst, args.kind)
    except WeightFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"converted {args.src} -> {args.dst}\n{report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

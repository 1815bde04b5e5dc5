"""Converts the official LVM-Med and SAM weight files into the plain state dicts this bundle's networks load.

Sources (Nguyen et al., "LVM-Med: Learning Large-Scale Self-Supervised Vision Models for Medical Imaging via
Second-order Graph Matching", NeurIPS 2023; Kirillov et al., "Segment Anything", ICCV 2023):

* ``lvmmed_resnet.torch``: torchvision ResNet-50 keys, possibly with the ``fc.*`` classifier, possibly wrapped in
  ``{"state_dict": ...}`` / ``{"model": ...}`` and prefixed ``module.`` (DataParallel) or ``backbone.``;
  target :class:`scripts.networks.resnet_encoder.ResNet50Encoder`.
* ``lvmmed_vit.pth`` (and LVM-Med's ViT-L/H): SAM image-encoder keys without ``pos_embed``; target
  :func:`scripts.networks.sam_vit.sam_vit` of the size found from the file's width and depth (B: 768 x 12,
  L: 1024 x 24, H: 1280 x 32), ``use_abs_pos=False``.
* ``sam_vit_{b,l,h}_*.pth``: ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``; the image encoder is
  checked against ``sam_vit(size, use_abs_pos=True)``, the prompt encoder and mask decoder against this bundle's
  modules of the same layout.

Every file is read with ``torch.load(weights_only=True)``: nothing in it is executed. The encoder goes through the
bundle's one loader (:func:`scripts.weights.encoder_state`: wrappers, prefixes, ``fc.*``, BatchNorm counters) and
every tensor is checked against the target network's names and shapes with :func:`scripts.weights.load_weights`;
the output is the network's own ``state_dict()`` after loading, written atomically.

Usage::

    python -m scripts.convert_weights --src lvmmed_resnet.torch --dst models/lvmmed_resnet.pt
    python -m scripts.convert_weights --src lvmmed_vit.pth --dst models/lvmmed_vit.pt --kind vit
    python -m scripts.convert_weights --src sam_vit_b_01ec64.pth --dst models/sam_vit_b.pt --kind sam
    python -m scripts.convert_weights --src sam_vit_h_4b8939.pth --dst models/sam_vit_h.pt  # kind and size from the keys
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from scripts.atomic_save import save_atomically
from scripts.networks.resnet_encoder import ResNet50Encoder
from scripts.networks.sam_mask_decoder import SamMaskDecoder
from scripts.networks.sam_prompt_encoder import SamPromptEncoder
from scripts.networks.sam_vit import sam_vit, sam_vit_size
from scripts.weights import (
    LoadReport,
    WeightFileError,
    encoder_state,
    find_encoder,
    load_weights,
    read_checkpoint,
    select_prefix,
    strip_prefixes,
    unwrap_state_dict,
)

__all__ = ["KINDS", "ConversionReport", "guess_kind", "convert_state_dict", "convert_file", "main"]

KINDS = ("resnet", "vit", "sam")
_SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_PATCH_SIZE = 16  # SAM's patch side: the image size follows from the global blocks' relative positions


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
        return "\n".join(lines)


def guess_kind(state: Mapping[str, torch.Tensor]) -> str:
    """``"sam"``, ``"vit"`` or ``"resnet"`` from the key names (after unwrapping and prefix stripping); an encoder
    inside a larger state dict (``image_encoder.``, ``encoder.``, ``network.encoder.``) is found too.

    Raises:
        WeightFileError: the keys match none of the three layouts.
    """
    if any(key.startswith("mask_decoder.") for key in state) and any(key.startswith("image_encoder.") for key in state):
        return "sam"
    try:
        _, layout = find_encoder(state, "the weights")
    except WeightFileError as error:
        raise WeightFileError(f"{error}; pass --kind") from error
    return {"resnet50": "resnet", "sam_vit": "vit"}[layout]


def _load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> tuple[dict, LoadReport]:
    """Loads ``state`` into ``module`` (names and shapes must match exactly) and returns the module's state."""
    report = load_weights(module, state, source=source)
    return module.state_dict(), report


def _convert_resnet(state: dict[str, torch.Tensor], source: str, report: ConversionReport) -> dict:
    state, notes = encoder_state(state, source, "resnet50")
    report.notes.extend(notes)
    encoder = ResNet50Encoder()  # the releases are 3-channel; loaders adapt the stem to grey networks
    converted, report.parts["encoder"] = _load_checked(encoder, state, source)
    return converted


def _vit_image_size(state: Mapping[str, torch.Tensor], source: str) -> int:
    """The training image side of a SAM ViT state: from ``pos_embed`` (1, g, g, C) or, without it, from the
    largest relative-position table (2 g - 1, head_dim) of the global-attention blocks."""
    if "pos_embed" in state:
        return int(state["pos_embed"].shape[1]) * _PATCH_SIZE
    tables = [value.shape[0] for key, value in state.items() if key.endswith("attn.rel_pos_h")]
    if not tables:
        raise WeightFileError(f"{source} has neither pos_embed nor attn.rel_pos_h tables: not a SAM ViT encoder")
    return (max(tables) + 1) // 2 * _PATCH_SIZE


def _convert_vit(state: dict[str, torch.Tensor], source: str, report: ConversionReport) -> dict:
    state, notes = encoder_state(state, source, "sam_vit")
    report.notes.extend(notes)
    try:
        size = sam_vit_size(state)
    except ValueError as error:
        raise WeightFileError(f"{source}: {error}") from error
    use_abs_pos = "pos_embed" in state
    img_size = _vit_image_size(state, source)
    report.notes.append(
        f"ViT-{size.upper()} image encoder for {img_size}x{img_size} images, "
        + ("with pos_embed: build it with use_abs_pos=True" if use_abs_pos else "without pos_embed (use_abs_pos=False)")
    )
    encoder = sam_vit(size, img_size=img_size, use_abs_pos=use_abs_pos)
    converted, report.parts["image_encoder"] = _load_checked(encoder, state, source)
    return converted


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
    image_state = _convert_vit(image_encoder, source, image_report)
    report.notes.extend(image_report.notes)
    report.parts.update(image_report.parts)
    converted.update({f"image_encoder.{key}": value for key, value in image_state.items()})
    # SAM's prompt encoder and mask decoder are the same for ViT-B, -L and -H (256-wide prompts)
    builders: dict[str, Callable[[], nn.Module]] = {"prompt_encoder": SamPromptEncoder, "mask_decoder": SamMaskDecoder}
    for part, builder in builders.items():
        part_state = select_prefix(state, f"{part}.")
        if not part_state:
            raise WeightFileError(f"{source} has no {part}.* keys")
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

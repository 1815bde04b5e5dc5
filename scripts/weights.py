"""The one way this bundle reads weight files and loads them into networks, with a report of what was done.

Every workflow (pretraining init, segmentation, classification, detection, prompt segmentation) loads its
pretrained encoder with :func:`load_pretrained_encoder`, and ``python -m scripts.convert_weights`` uses the same
steps (:func:`encoder_state`), so a file that loads in one place loads, or fails with the same message, in all.

Accepted files: this bundle's encoder export (``models/encoder_r50.pt``, ``models/encoder_vit.pt``), the LVM-Med
releases (Nguyen et al., NeurIPS 2023: ``lvmmed_resnet.torch`` with torchvision ResNet-50 keys and ``fc.*``,
``lvmmed_vit.pth`` with SAM image-encoder keys and no ``pos_embed``), SAM checkpoints (Kirillov et al., ICCV 2023:
``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``), training checkpoints wrapping one of these
(``{"state_dict": ...}``, ``{"model": ...}``) and keys prefixed by ``module.`` (DataParallel), ``backbone.``
(self-supervised wrappers) or ``encoder.`` (a whole classifier or pretraining network). Files are read with
``torch.load(weights_only=True)``: nothing in them is executed.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "ENCODER_LAYOUTS",
    "LoadReport",
    "WeightFileError",
    "adapt_first_conv",
    "encoder_layout",
    "encoder_state",
    "find_encoder",
    "load_encoder_weights",
    "load_network_weights",
    "load_pretrained_encoder",
    "load_weights",
    "read_checkpoint",
    "read_state_dict",
    "select_prefix",
    "strip_prefixes",
    "unwrap_state_dict",
]

logger = logging.getLogger(__name__)

# layout -> (a key every encoder of that layout has, the key of its first convolution)
ENCODER_LAYOUTS = {
    "resnet50": ("layer1.0.conv1.weight", "conv1.weight"),
    "sam_vit": ("patch_embed.proj.weight", "patch_embed.proj.weight"),
}
# entries of a training checkpoint that hold the network's weights, tried in this order
_WRAPPER_KEYS = ("state_dict", "model")
_PARALLEL_PREFIX = "module."
_BACKBONE_PREFIX = "backbone."
# where an encoder sits inside a larger state dict: SAM's whole model, a classifier or pretraining network, a
# pretraining checkpoint of this bundle (PretrainModel: network.encoder)
_ENCODER_PREFIXES = ("", "image_encoder.", "encoder.", "network.encoder.")
# parts of a release that are not the encoder: torchvision's ImageNet classifier
_HEAD_PREFIXES = {"resnet50": ("fc.",), "sam_vit": ()}


class WeightFileError(ValueError):
    """A weight file is missing, unreadable, not a plain state dict, or does not fit the network."""


@dataclass
class LoadReport:
    """What a load did: keys loaded, keys of the network left as initialised, keys ignored, and every change made
    to the file's state on the way (``notes``: unwrapping, prefixes, dropped parts, adapted tensors)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        summary = f"{len(self.loaded)} tensors loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected"
        return "; ".join([summary, *self.notes])


def read_checkpoint(path: str | os.PathLike) -> object:
    """Whatever a torch file holds, read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
    containers of them; nothing in the file is executed (pickled classes and functions are refused by torch).

    Raises:
        WeightFileError: the file is missing, truncated or corrupt, or holds objects other than the above.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"weight file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, AttributeError) as error:
        raise WeightFileError(f"{path} is not a readable, weights-only torch file: {error}") from error


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a plain state dict (a mapping of names to tensors) with ``torch.load(weights_only=True)``.

    A file holding anything but a flat ``{name: tensor}`` mapping (a whole training checkpoint, a pickled module)
    is refused, with the file named in the error.

    Raises:
        WeightFileError: the file is missing, truncated or corrupt, unsafe, or not a plain state dict.
    """
    path = Path(path)
    state = read_checkpoint(path)
    if not isinstance(state, Mapping):
        raise WeightFileError(f"{path} holds a {type(state).__name__}, not a state dict of name -> tensor")
    not_tensors = [str(key) for key, value in state.items() if not (isinstance(key, str) and torch.is_tensor(value))]
    if not_tensors:
        shown = ", ".join(not_tensors[:5])
        raise WeightFileError(
            f"{path} is not a plain state dict: entries {shown} are not tensors (a training checkpoint? "
            "export the network's state_dict, e.g. with python -m scripts.convert_weights)"
        )
    return dict(state)


def select_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose key starts with ``prefix``, with the prefix removed (``""`` keeps all)."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def unwrap_state_dict(checkpoint: object, source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Finds the flat ``{name: tensor}`` mapping in a loaded checkpoint.

    A training checkpoint ``{"state_dict": {...}, "epoch": ..., "optimizer": ...}`` (or with ``"model"``) is
    unwrapped, nested wrappers too; the entries left out are named in the returned notes.

    Raises:
        WeightFileError: ``checkpoint`` is not a mapping, or holds non-tensor entries and no known wrapper.
    """
    notes: list[str] = []
    current, path = checkpoint, ""
    while True:
        if not isinstance(current, Mapping):
            raise WeightFileError(f"{source}{path} holds a {type(current).__name__}, not a state dict")
        tensors = [key for key, value in current.items() if isinstance(key, str) and torch.is_tensor(value)]
        others = [str(key) for key, value in current.items() if not (isinstance(key, str) and torch.is_tensor(value))]
        if tensors and not others:
            return {key: current[key] for key in tensors}, notes
        wrapper = next((key for key in _WRAPPER_KEYS if isinstance(current.get(key), Mapping)), None)
        if wrapper is None:
            shown = ", ".join(others[:8]) if tensors else ", ".join(map(str, list(current)[:8]))
            raise WeightFileError(
                f"{source}{path} is not a state dict of name -> tensor and has no "
                f"{' or '.join(repr(k) for k in _WRAPPER_KEYS)} entry holding one; its entries include: {shown}"
            )
        left_out = sorted(str(key) for key in current if key != wrapper)
        notes.append(f'unwrapped checkpoint{path}["{wrapper}"]' + (f" (left out: {', '.join(left_out)})" if left_out else ""))
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


def encoder_layout(state: Mapping[str, torch.Tensor]) -> str | None:
    """``"resnet50"`` (torchvision keys) or ``"sam_vit"`` (SAM image-encoder keys) from the keys of an encoder's
    state dict (without prefixes), None when neither fits."""
    layouts = [layout for layout, (key, _) in ENCODER_LAYOUTS.items() if key in state]
    return layouts[0] if len(layouts) == 1 else None


def find_encoder(state: Mapping[str, torch.Tensor], source: str) -> tuple[str, str]:
    """The prefix under which ``state`` holds an encoder (``""``, ``"image_encoder."``, ``"encoder."``,
    ``"network.encoder."``) and that encoder's layout (:func:`encoder_layout`).

    Raises:
        WeightFileError: no encoder of a known layout under any of these prefixes; the message shows some keys.
    """
    for prefix in _ENCODER_PREFIXES:
        layout = encoder_layout(select_prefix(state, prefix))
        if layout is not None:
            return prefix, layout
    raise WeightFileError(
        f"{source}: cannot tell the encoder kind from its keys ({', '.join(list(state)[:6])}, ...); expected "
        f"torchvision ResNet-50 keys (e.g. {ENCODER_LAYOUTS['resnet50'][0]}) or SAM ViT keys (e.g. "
        f"{ENCODER_LAYOUTS['sam_vit'][0]}), possibly under {', '.join(repr(p) for p in _ENCODER_PREFIXES[1:])}"
    )


def adapt_first_conv(state: dict[str, torch.Tensor], key: str, in_channels: int, source: str) -> str | None:
    """Adapts a 3-channel first convolution to a 1-channel network in place: its kernels are summed over the input
    channels, so a grey image x gives the response the 3-channel encoder gives to (x, x, x).

    Returns:
        a note saying what was changed, or None when nothing was.

    Raises:
        WeightFileError: the file's input channels differ from ``in_channels`` in another way.
    """
    weight = state.get(key)
    if weight is None or weight.ndim != 4 or weight.shape[1] == in_channels:
        return None
    if in_channels == 1 and weight.shape[1] == 3:
        state[key] = weight.sum(dim=1, keepdim=True)
        return f"{key} summed over its 3 input channels for a 1-channel network"
    raise WeightFileError(
        f"{source}: {key} takes {weight.shape[1]} input channels but the network has in_channels={in_channels} "
        "(only a 3-channel checkpoint into a 1-channel network is adapted)"
    )


def encoder_state(
    checkpoint: object, source: str, layout: str, in_channels: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The encoder's entries of a loaded checkpoint, in this bundle's key names, and a note per change.

    Steps: unwrap ``state_dict``/``model`` wrappers; strip ``module.``/``backbone.``; take the entries under
    ``image_encoder.`` or ``encoder.`` when the encoder sits there; check the file holds an encoder of ``layout``;
    drop torchvision's ``fc.*``; fill BatchNorm ``num_batches_tracked`` counters absent from files saved before
    torch 0.4.1 (they only matter for ``momentum=None``); sum a 3-channel first convolution for ``in_channels=1``.

    Args:
        checkpoint: what ``torch.load(weights_only=True)`` returned.
        source: the file name, used in messages.
        layout: ``"resnet50"`` or ``"sam_vit"`` (:data:`ENCODER_LAYOUTS`), the layout of the target encoder.
        in_channels: input channels of the target encoder; None leaves the first convolution as it is.

    Raises:
        WeightFileError: not a state dict, no encoder found, or an encoder of another layout.
        ValueError: an unknown ``layout``.
    """
    if layout not in ENCODER_LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(ENCODER_LAYOUTS)}, got {layout!r}.")
    state, notes = unwrap_state_dict(checkpoint, source)
    state, prefix_notes = strip_prefixes(state)
    notes += prefix_notes
    prefix, held = find_encoder(state, source)
    if held != layout:
        raise WeightFileError(
            f"{source} holds {held} encoder weights, which do not fit a {layout} encoder "
            "(ResNet-50 weights go into unet_r50 / ResNet50Encoder, ViT weights into transunet / SamViTEncoder)"
        )
    if prefix:
        dropped = sorted({key.split(".")[0] + "." for key in state if not key.startswith(prefix)})
        state = select_prefix(state, prefix)
        notes.append(f'kept the "{prefix}" entries without their prefix' + (f"; dropped {', '.join(dropped)}" if dropped else ""))
    head = sorted(key for key in state if key.startswith(_HEAD_PREFIXES[layout]))
    if head:
        state = {key: value for key, value in state.items() if key not in head}
        notes.append(f"dropped {', '.join(head)} (classifier head; the encoder ends at global pooling)")
    means = [key for key in state if key.endswith(".running_mean")]
    counters = [key.replace(".running_mean", ".num_batches_tracked") for key in means]
    absent = [key for key in counters if key not in state]
    if absent:
        state.update({key: torch.tensor(0, dtype=torch.long) for key in absent})
        notes.append(f"filled {len(absent)} missing batch-norm num_batches_tracked counters with 0")
    if in_channels is not None:
        note = adapt_first_conv(state, ENCODER_LAYOUTS[layout][1], in_channels, source)
        if note:
            notes.append(note)
    return state, notes


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> LoadReport:
    """Copies ``state`` into ``module`` after checking every name and shape.

    Args:
        module: the network (or sub-network) to fill.
        state: name -> tensor, with the module's own key names.
        source: where the weights come from (a file name), used in errors.

    Raises:
        WeightFileError: a shape differs, the state has keys the module lacks, or the module has keys the state
            lacks. The message lists the keys.
    """
    own = module.state_dict()
    mismatched = [
        f"{key}: file {tuple(value.shape)} vs network {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    unexpected = sorted(key for key in state if key not in own)
    missing = sorted(key for key in own if key not in state)
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:10]))
    if unexpected:
        problems.append(f"{len(unexpected)} keys not in the network: " + ", ".join(unexpected[:10]))
    if missing:
        problems.append(f"{len(missing)} network keys not in the file: " + ", ".join(missing[:10]))
    if "pos_embed" in unexpected or "pos_embed" in missing:
        problems.append(
            "the file " + ("has" if "pos_embed" in unexpected else "lacks")
            + " an absolute position embedding: build the ViT with use_abs_pos="
            + ("True (SAM's own weights)" if "pos_embed" in unexpected else "False (the LVM-Med releases)")
        )
    if problems:
        raise WeightFileError(f"weights from {source} do not fit {type(module).__name__}: " + " | ".join(problems))
    module.load_state_dict(dict(state), strict=True)
    return LoadReport(loaded=sorted(state))


def _target_encoder(module: nn.Module) -> nn.Module:
    """The encoder inside a downstream network (its ``encoder`` attribute), else ``module`` itself."""
    inner = getattr(module, "encoder", None)
    return inner if isinstance(inner, nn.Module) else module


def load_encoder_weights(encoder: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Fills ``encoder`` (a ``ResNet50Encoder`` or ``SamViTEncoder``) from ``path`` and says what was done.

    The file goes through :func:`encoder_state` (wrappers, prefixes, ``fc.*``, BatchNorm counters, 3 -> 1 channel
    first convolution) and :func:`load_weights` (every name and shape checked; nothing else is tolerated).

    Raises:
        WeightFileError: the file is missing or unsafe, holds another layout, or does not fit; the message names
            the file and the keys.
    """
    layout = encoder_layout(encoder.state_dict())
    if layout is None:
        raise TypeError(f"encoder must be a ResNet-50 or SAM ViT encoder of this bundle, got {type(encoder).__name__}.")
    in_channels = encoder.state_dict()[ENCODER_LAYOUTS[layout][1]].shape[1]
    source = os.fspath(path)
    state, notes = encoder_state(read_checkpoint(path), source, layout, in_channels)
    report = load_weights(encoder, state, source=source)
    report.notes = notes
    return report


def load_pretrained_encoder(module: nn.Module, path: str | os.PathLike | None) -> nn.Module:
    """Fills the encoder of ``module`` with pretrained weights and returns ``module`` (for bundle configs).

    ``module`` is an encoder (``ResNet50Encoder``, ``SamViTEncoder``) or a network holding one as ``encoder``
    (``ResNet50UNet``, ``TransUNet``, ``EncoderClassifier``, ``LVMMedNetwork``). The file is loaded with
    :func:`load_encoder_weights`; the report (what was loaded, dropped and adapted) is logged.

    Args:
        module: the encoder or the network to fill.
        path: the weight file; None (or "") leaves ``module`` randomly initialised (logged).

    Raises:
        WeightFileError: see :func:`load_encoder_weights`.
    """
    if path is None or os.fspath(path) == "":
        logger.info("no pretrained encoder given: %s keeps its random initialisation", type(module).__name__)
        return module
    encoder = _target_encoder(module)
    report = load_encoder_weights(encoder, path)
    logger.info("pretrained encoder of %s from %s: %s", type(module).__name__, os.fspath(path), report)
    return module


def load_network_weights(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Fills a whole trained network (e.g. ``models/model.pt`` written by training) from a plain state dict, every
    key and shape checked, and returns it (inference configs).

    Raises:
        WeightFileError: the file is missing, unsafe, not a plain state dict or does not fit ``network``.
    """
    report = load_weights(network, read_state_dict(path), source=os.fspath(path))
    logger.info("weights of %s from %s: %s", type(network).__name__, os.fspath(path), report)
    return network

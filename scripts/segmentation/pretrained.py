"""Pretrained encoder weights (LVM-Med export, official LVM-Med releases) loaded into the segmentation networks."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

from scripts.weights import LoadReport, WeightFileError, load_weights, read_state_dict

__all__ = ["ENCODER_KINDS", "detect_encoder_kind", "load_pretrained_encoder"]

logger = logging.getLogger(__name__)

# kind -> a key every file of that kind holds (after removing the wrapper prefixes below)
ENCODER_KINDS = {"resnet50": "layer4.0.conv1.weight", "sam_vit": "patch_embed.proj.weight"}
# prefixes added by wrappers: DistributedDataParallel, SAM's whole-model checkpoint
_WRAPPER_PREFIXES = ("module.", "image_encoder.")
# parts of the files that are not the encoder: torchvision's classifier, SAM's prompt encoder and mask decoder
_NOT_ENCODER = ("fc.", "prompt_encoder.", "mask_decoder.")


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if any(key.startswith(prefix) for key in state):
            state = {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state.items()}
    return state


def detect_encoder_kind(state: Mapping[str, torch.Tensor], source: str) -> str:
    """``"resnet50"`` (torchvision keys: ``lvmmed_resnet.torch``, ``encoder_r50.pt``) or ``"sam_vit"`` (SAM
    image-encoder keys: ``lvmmed_vit.pth``), from the keys of ``state``.

    Raises:
        WeightFileError: the keys fit neither layout; the message shows some of them.
    """
    kinds = [kind for kind, key in ENCODER_KINDS.items() if key in state]
    if len(kinds) != 1:
        shown = ", ".join(list(state)[:6])
        raise WeightFileError(
            f"{source}: cannot tell the encoder kind from its keys ({shown}, ...); expected torchvision ResNet-50 "
            f"keys (e.g. {ENCODER_KINDS['resnet50']}) or SAM ViT keys (e.g. {ENCODER_KINDS['sam_vit']})"
        )
    return kinds[0]


def _adapt_first_conv(state: dict[str, torch.Tensor], key: str, in_channels: int, source: str) -> None:
    """A 3-channel first convolution feeding a 1-channel network: its kernels are summed over the input channels,
    so a grey image x gives the response the 3-channel encoder gives to (x, x, x)."""
    weight = state.get(key)
    if weight is None or weight.ndim != 4 or weight.shape[1] == in_channels:
        return
    if in_channels == 1 and weight.shape[1] == 3:
        state[key] = weight.sum(dim=1, keepdim=True)
        logger.info("%s: %s summed over its %d input channels for a 1-channel network", source, key, weight.shape[1])
        return
    raise WeightFileError(
        f"{source}: {key} takes {weight.shape[1]} input channels but the network has in_channels={in_channels} "
        "(only a 3-channel checkpoint into a 1-channel network is adapted)"
    )


def load_pretrained_encoder(network: nn.Module, path: str | os.PathLike | None, kind: str = "auto") -> nn.Module:
    """Fills ``network.encoder`` with pretrained weights from ``path`` and returns ``network``.

    Accepted files are plain state dicts (``scripts.weights.read_state_dict``) in one of two layouts:

    - ``"resnet50"``: torchvision ResNet-50 keys, e.g. this bundle's ``models/encoder_r50.pt`` or the official
      ``lvmmed_resnet.torch``; ``fc.*`` is ignored. Loads into ``ResNet50UNet``.
    - ``"sam_vit"``: SAM image-encoder keys, e.g. the official ``lvmmed_vit.pth`` (no ``pos_embed``); an
      ``image_encoder.`` prefix (SAM's whole checkpoint) is removed and the prompt encoder and mask decoder
      ignored. Loads into ``TransUNet``.

    A ``module.`` prefix (saved from DistributedDataParallel) is removed, missing BatchNorm ``num_batches_tracked``
    counters are tolerated. A 3-channel first convolution is summed over its input channels when the network has
    ``in_channels=1``. Every other mismatch (shape, missing or extra key) is an error listing the keys.

    Args:
        network: a ``ResNet50UNet`` or ``TransUNet`` (any module with ``encoder``, ``encoder_kind``,
            ``first_conv_key`` and ``in_channels``).
        path: the weight file; None leaves the network as initialised.
        kind: ``"auto"`` (detected from the keys), ``"resnet50"`` or ``"sam_vit"``.

    Raises:
        WeightFileError: missing or unreadable file, a layout that is not ``kind`` or does not fit the network.
        ValueError: an unknown ``kind``.
    """
    if path is None:
        return network
    if kind != "auto" and kind not in ENCODER_KINDS:
        raise ValueError(f"pretrained encoder kind must be 'auto' or one of {sorted(ENCODER_KINDS)}, got {kind!r}.")
    source = os.fspath(path)
    state = _strip_wrappers(read_state_dict(path))
    detected = detect_encoder_kind(state, source)
    if kind != "auto" and detected != kind:
        raise WeightFileError(f"{source} holds {detected} weights, but the configured kind is {kind!r}")
    expected = getattr(network, "encoder_kind", None)
    if detected != expected:
        raise WeightFileError(
            f"{source} holds {detected} encoder weights, which do not fit {type(network).__name__} (a {expected} "
            "encoder): use architecture 'unet_r50' for ResNet-50 weights and 'transunet' for ViT weights"
        )
    _adapt_first_conv(state, network.first_conv_key, network.in_channels, source)
    # BatchNorm step counters are absent from older torchvision-era files and have no effect on the weights
    for key, value in network.encoder.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    report: LoadReport = load_weights(network.encoder, state, source=source, ignore_unexpected=_NOT_ENCODER)
    logger.info("pretrained encoder from %s: %s", source, report)
    return network

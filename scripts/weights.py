"""Reading weight files safely and loading them into networks with a report of what matched."""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "KNOWN_PREFIXES",
    "LoadReport",
    "WeightFileError",
    "load_pretrained",
    "load_weights",
    "read_checkpoint",
    "read_state_dict",
    "select_prefix",
]

logger = logging.getLogger(__name__)


class WeightFileError(ValueError):
    """A weight file is missing, unreadable, not a plain state dict, or does not fit the network."""


@dataclass
class LoadReport:
    """What ``load_weights`` did: keys loaded, keys of the network left as initialised, keys ignored."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{len(self.loaded)} tensors loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected"


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

    Nothing in the file is executed: pickled objects other than tensors and containers are refused by
    torch, and a file holding anything but a flat ``{name: tensor}`` mapping (a whole training
    checkpoint, a pickled module) is refused here, with the file named in the error.

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


def load_weights(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    ignore_unexpected: Iterable[str] = (),
    allow_missing: Iterable[str] = (),
) -> LoadReport:
    """Copies ``state`` into ``module`` after checking names and shapes, and says what did not fit.

    Args:
        module: the network (or sub-network) to fill.
        state: name -> tensor, with the module's own key names.
        source: where the weights come from (a file name), used in errors.
        ignore_unexpected: key prefixes of ``state`` that the module may lack (e.g. ``"fc."``).
        allow_missing: key prefixes of the module that may stay as initialised (e.g. a new head).

    Raises:
        WeightFileError: a shape differs, the state has keys the module lacks, or the module has keys
            the state lacks, outside the allowed prefixes. The message lists the keys.
    """
    ignore_unexpected, allow_missing = tuple(ignore_unexpected), tuple(allow_missing)
    own = module.state_dict()
    mismatched = [
        f"{key}: file {tuple(value.shape)} vs network {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    unexpected = sorted(key for key in state if key not in own)
    missing = sorted(key for key in own if key not in state)
    bad_unexpected = [key for key in unexpected if not key.startswith(ignore_unexpected)]
    bad_missing = [key for key in missing if not key.startswith(allow_missing)]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:10]))
    if bad_unexpected:
        problems.append(f"{len(bad_unexpected)} keys not in the network: " + ", ".join(bad_unexpected[:10]))
    if bad_missing:
        problems.append(f"{len(bad_missing)} network keys not in the file: " + ", ".join(bad_missing[:10]))
    if problems:
        raise WeightFileError(f"weights from {source} do not fit {type(module).__name__}: " + " | ".join(problems))
    module.load_state_dict({key: value for key, value in state.items() if key in own}, strict=False)
    return LoadReport(loaded=sorted(key for key in state if key in own), missing=missing, unexpected=unexpected)

# prefixes under which an encoder's keys are stored in known checkpoints: our own export and the LVM-Med releases
# (none), SAM's full checkpoint (``image_encoder.``), DistributedDataParallel (``module.``), a whole classifier.
KNOWN_PREFIXES = ("", "image_encoder.", "module.", "encoder.", "module.encoder.")


def _best_prefix(module: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """The known prefix under which ``state`` holds most of ``module``'s keys."""
    own = set(module.state_dict())
    return max(KNOWN_PREFIXES, key=lambda prefix: len(own & {key[len(prefix):] for key in state if key.startswith(prefix)}))


def load_pretrained(
    encoder: nn.Module,
    path: str | os.PathLike | None,
    *,
    prefix: str | None = None,
    ignore_unexpected: Sequence[str] = ("fc.",),
) -> nn.Module:
    """Fills ``encoder`` with pretrained weights and returns it (for use in bundle configs).

    Reads ``path`` with :func:`scripts.weights.read_state_dict` (weights only, nothing executed) and loads it
    with :func:`scripts.weights.load_weights`, which checks every key and shape. Works with the encoder
    exported by pretraining (``models/encoder_r50.pt``, ``models/encoder_vit.pt``), the official
    ``lvmmed_resnet.torch`` (its ``fc.*`` is ignored), ``lvmmed_vit.pth`` and SAM checkpoints (keys under
    ``image_encoder.``; build the encoder with ``use_abs_pos=True`` for SAM's own weights).

    Args:
        encoder: the encoder to fill.
        path: the weight file; None leaves the encoder randomly initialised (logged).
        prefix: key prefix of the encoder inside the file; None picks the best of :data:`KNOWN_PREFIXES`.
        ignore_unexpected: key prefixes (after removing ``prefix``) that the file may hold and the encoder lacks.

    Raises:
        WeightFileError: the file is missing, unsafe or not a state dict, or its keys/shapes do not fit; the
            message names the file and the keys.
    """
    if path is None or str(path) == "":
        logger.info("no pretrained weights given: %s keeps its random initialisation", type(encoder).__name__)
        return encoder
    state = read_state_dict(path)
    prefix = _best_prefix(encoder, state) if prefix is None else prefix
    selected = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not selected:
        raise WeightFileError(f"{path} holds no keys under the prefix {prefix!r}")
    report: LoadReport = load_weights(encoder, selected, source=str(path), ignore_unexpected=ignore_unexpected)
    logger.info("loaded %s into %s from %s (prefix %r)", report, type(encoder).__name__, path, prefix)
    return encoder

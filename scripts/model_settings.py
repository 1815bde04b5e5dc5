"""The settings a model was trained with, stored beside its weights and read back by every workflow that uses it.

A trained network is only usable with the settings it was trained with: image size, input channels, classes and
their names, normalisation, intensity window, slicing, architecture, and the encoder it started from. Training
writes them to a JSON file beside the weights (``models/model.pt`` -> ``models/model.settings.json``, written
atomically each time the weights are), so evaluation, inference, ONNX export and MONAI Label read them instead of
asking for them again on the command line. The weights stay a plain state dict, as MONAI's ``CheckpointLoader``,
``ckpt_export`` and MONAI Label expect.

The same settings, with a digest of the training and validation items, identify a training run: each resume
checkpoint stores that *run identity*, and a run resumes only from checkpoints of the same identity
(``scripts.handlers.checkpoint``).

In a config that reads a model, each such key defaults to the stored value::

    "model_settings": "$scripts.model_settings.read_settings(@checkpoint)",
    "image_size": "$@model_settings.get('image_size', 96)",

and its ``initialize`` list warns about every value given on the command line that contradicts the stored one
(:func:`warn_contradictions`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.atomic_save import write_atomically

__all__ = ["SETTINGS_SUFFIX", "ModelSettingsError", "class_names", "contradictions", "data_digest", "differences",
           "read_settings", "run_identity", "run_settings", "settings_path", "warn_contradictions", "write_settings"]

logger = logging.getLogger(__name__)

SETTINGS_SUFFIX = ".settings.json"
IDENTITY_KEY = "run_identity"


class ModelSettingsError(ValueError):
    """A settings file that cannot be read (not JSON, not an object); the message names the file."""


def settings_path(weights: str | os.PathLike) -> Path:
    """The settings file of a weights file: ``models/model.pt`` -> ``models/model.settings.json``."""
    path = Path(weights)
    return path.with_name(path.stem + SETTINGS_SUFFIX)


def _canonical(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists, keys strings), so stored and given values compare
    equal when they mean the same."""
    return json.loads(json.dumps(value, default=str))


def run_identity(settings: Mapping[str, Any]) -> str:
    """A 16-hex-digit digest of ``settings`` (key order does not matter; the identity key itself is left out)."""
    content = {key: value for key, value in settings.items() if key != IDENTITY_KEY}
    text = json.dumps(_canonical(content), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def data_digest(*splits: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What identifies a run's data: the number of items of each split and a digest of their contents (paths).

    Args:
        splits: the items of each split, e.g. the training and the validation datalist.

    Returns:
        ``{"items": [n_split_0, ...], "sha256": first 16 hex digits}``.
    """
    text = json.dumps([_canonical(list(split)) for split in splits], sort_keys=True, separators=(",", ":"))
    return {"items": [len(split) for split in splits], "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]}


def run_settings(model_settings: Mapping[str, Any], *splits: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The settings that define a training run: the model's settings and the digest of its data (:func:`data_digest`).

    Example (training config)::

        "run_settings": "$scripts.model_settings.run_settings(@model_settings, @train#dataset#data, @validate#dataset#data)"
    """
    return {**_canonical(dict(model_settings)), "data": data_digest(*splits)}


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: stored X, now Y"`` for each key whose value differs between two settings (the identity aside)."""
    old, new = _canonical(dict(stored)), _canonical(dict(current))
    keys = [key for key in dict.fromkeys([*new, *old]) if key != IDENTITY_KEY]
    return [f"{key}: {old.get(key, '(absent)')!r} there, {new.get(key, '(absent)')!r} now"
            for key in keys if old.get(key) != new.get(key)]


def write_settings(weights: str | os.PathLike, settings: Mapping[str, Any]) -> Path:
    """Writes ``settings`` (and their :func:`run_identity`) beside ``weights`` atomically; returns the file."""
    content = {**_canonical(dict(settings)), IDENTITY_KEY: run_identity(settings)}
    text = json.dumps(content, indent=2, sort_keys=True) + "\n"
    return write_atomically(settings_path(weights), lambda temporary: temporary.write_text(text, encoding="utf-8"))


def read_settings(weights: str | os.PathLike | None) -> dict[str, Any]:
    """The settings stored beside ``weights``; ``{}`` when there is no settings file (weights from elsewhere, or a
    model trained before settings were stored), so that configs fall back to their defaults.

    Raises:
        ModelSettingsError: the settings file exists but is not a JSON object; the message names it.
    """
    if weights is None or os.fspath(weights) == "":
        return {}
    path = settings_path(weights)
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelSettingsError(f"{path}: cannot read the model's settings ({error}); delete the file to use the "
                                 "config's values instead") from error
    if not isinstance(content, dict):
        raise ModelSettingsError(f"{path}: the model's settings must be a JSON object, got {type(content).__name__}")
    return content


def contradictions(stored: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """``"key=given (trained with stored)"`` for each key of ``given`` whose stored value differs."""
    old, new = _canonical(dict(stored)), _canonical(dict(given))
    return [f"{key}={new[key]!r} (trained with {old[key]!r})" for key in new if key in old and old[key] != new[key]]


def warn_contradictions(weights: str | os.PathLike, stored: Mapping[str, Any], **given: Any) -> list[str]:
    """Warns (one line) when a value the workflow uses contradicts the one ``weights`` was trained with.

    The workflow's values default to the stored ones, so a contradiction comes from the command line (or an edited
    config); it is used as given, which is what the warning says.

    Args:
        weights: the weights file, named in the warning.
        stored: its settings (:func:`read_settings`).
        given: the workflow's values by key, e.g. ``image_size=@image_size``.

    Returns:
        the contradictions (empty when none).

    Example (first entries of a config's ``initialize`` list)::

        "$scripts.model_settings.warn_contradictions(@checkpoint, @model_settings, image_size=@image_size)"
    """
    found = contradictions(stored, given)
    if found:
        logger.warning("%s was trained with other settings than given: %s; using the given values (leave them out to "
                       "use the stored ones from %s)", os.fspath(weights), "; ".join(found), settings_path(weights))
    return found


def _datalist_labels(datalist_file: str | os.PathLike) -> list[str] | None:
    """The class names of an MSD-style datalist's ``labels`` object (``{"0": "background", "1": ...}``), or None."""
    try:
        labels = json.loads(Path(datalist_file).read_text(encoding="utf-8")).get("labels")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None  # the datalist's own reader reports an unreadable file, naming it
    if not isinstance(labels, dict) or not labels:
        return None
    try:
        indices = sorted(int(key) for key in labels)
    except ValueError:
        return None
    if indices != list(range(len(indices))):
        return None
    return [str(labels[str(index)]) for index in indices]


def class_names(num_classes: int, names: Sequence[str] | None = None,
                datalist_file: str | os.PathLike | None = None, background: bool = True) -> list[str]:
    """The name of every class, in output-channel order (for segmentation, index = label value, 0 the background).

    The first of these with ``num_classes`` names is used: ``names`` (e.g. the stored ones), the ``labels`` of the
    MSD-style datalist ``datalist_file``; otherwise generic names (``background``, ``class 1``, ...). Names of
    another length are left out with a warning.

    Args:
        num_classes: number of output channels (>= 1).
        names: preferred names, or None.
        datalist_file: a datalist JSON that may hold ``labels``, or None.
        background: whether class 0 is the background (segmentation) in the generic names.

    Raises:
        ValueError: ``num_classes`` is below 1.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    candidates = [("the given class_names", None if names is None else [str(name) for name in names])]
    if datalist_file:
        candidates.append((f"the labels of {os.fspath(datalist_file)}", _datalist_labels(datalist_file)))
    for source, candidate in candidates:
        if candidate is None:
            continue
        if len(candidate) == num_classes:
            return candidate
        logger.warning("%s name %d classes %s but num_classes is %d: not used", source, len(candidate), candidate,
                       num_classes)
    return [("background" if background and index == 0 else f"class {index}") for index in range(num_classes)]

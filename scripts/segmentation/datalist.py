"""Segmentation datalists: a dataset in one of the standard layouts read into its splits, a folder of images listed
for inference, and every file checked before a run starts.

:func:`dataset_splits` reads, by what ``source`` is:

- a datalist JSON file in the Medical Segmentation Decathlon layout (``{"training": [{"image", "label"}, ...],
  "validation": [...], "test": [...]}``; MSD's ``test`` may list bare image paths), with relative paths resolved
  against the JSON file's own folder, by MONAI's ``load_decathlon_datalist``;
- a folder holding such a JSON as ``dataset.json`` (an MSD task folder) or ``datalist.json`` (this bundle's
  layout, e.g. the embedded data);
- a folder of image/mask pairs (``imagesTr/`` + ``labelsTr/``, ``images/`` + ``masks/`` ...; the folder and
  matching rules are in :mod:`scripts.data.layouts`).

A dataset without a ``validation`` split gets one drawn from ``training`` by a seeded fraction
(:func:`scripts.data.layouts.draw_validation`). Nothing is written.

A run over hundreds of images should not fail at image 312 with a message from deep inside a reader. The checks
(:func:`check_items`) read only headers (``scripts.data.readers.read_header``) and report the first bad item with its
file: missing or unreadable image or label, a label whose shape differs from its image's, a colour label, an image
whose channel count the network cannot take. Multi-channel volumes (a 4D NIfTI with the channels last, as in the
MSD's BraTS task) are volumes with that many channels.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from monai.data import load_decathlon_datalist

from scripts.data.layouts import LayoutError, draw_validation, list_images, pair_folders, pair_items
from scripts.data.readers import ImageReadError, read_header

__all__ = ["DATALIST_NAMES", "DataSplits", "SegmentationDataError", "check_items", "dataset_splits",
           "folder_datalist", "inference_items", "read_split"]

logger = logging.getLogger(__name__)

DATALIST_NAMES = ("dataset.json", "datalist.json")  # an MSD task folder's, this bundle's


class SegmentationDataError(ValueError):
    """A dataset or one of its items cannot be used for segmentation; the message names the file and the problem."""


class DataSplits(dict):
    """``{split: items}`` of one dataset; asking for a split it lacks raises an error naming the dataset and the
    splits it has.

    Args:
        source: the datalist file or folder the splits come from (for messages).
        splits: the items of each split.
        datalist_file: the JSON file read (which may name the classes under ``labels``, as the MSD's do), None for
            a folder of image/mask pairs.
    """

    def __init__(self, source: str | os.PathLike, splits: Mapping[str, list[dict]],
                 datalist_file: Path | None = None) -> None:
        super().__init__(splits)
        self.source = str(source)
        self.datalist_file = datalist_file

    def __missing__(self, split: str) -> list[dict]:
        raise SegmentationDataError(f"{self.source}: no split {split!r}; it has {', '.join(map(repr, self)) or 'none'}")


def read_split(datalist_file: str | os.PathLike, split: str, base_dir: str | os.PathLike | None = None) -> list[dict]:
    """The items of ``split`` (e.g. ``"training"``) of a Medical Segmentation Decathlon style JSON datalist, with
    paths made absolute against ``base_dir`` (default: the JSON file's folder).

    Raises:
        SegmentationDataError: the file is missing or is not JSON, or has no such split.
    """
    path = Path(datalist_file)
    if not path.is_file():
        raise SegmentationDataError(f"datalist {path} does not exist")
    try:
        return load_decathlon_datalist(path, is_segmentation=True, data_list_key=split,
                                       base_dir=base_dir if base_dir is not None else path.parent)
    except ValueError as error:  # json.JSONDecodeError is a ValueError; MONAI raises ValueError for a missing key
        raise SegmentationDataError(f"datalist {path}: cannot read split {split!r} ({error})") from error


def _json_splits(path: Path) -> dict[str, list[dict]]:
    """The non-empty list-valued keys of a datalist JSON (the MSD's metadata, strings and dicts, are not splits)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SegmentationDataError(f"datalist {path}: not a readable JSON file ({error})") from None
    if not isinstance(document, dict):
        raise SegmentationDataError(f"datalist {path}: must be a JSON object with one list per split")
    splits = {}
    for split, items in document.items():
        if not isinstance(items, list) or not items:
            continue
        if split != "test" and not all(isinstance(item, dict) for item in items):
            raise SegmentationDataError(f"datalist {path}: split {split!r} must list objects with 'image' (and "
                                        "'label'); only 'test' may list bare image paths")
        splits[split] = read_split(path, split)
    return splits


def _layout_splits(source: Path) -> tuple[Path | None, dict[str, list[dict]]]:
    """(the datalist JSON read, None for image/mask folders; the splits)."""
    if source.is_file():
        return source, _json_splits(source)
    if not source.is_dir():
        raise SegmentationDataError(f"{source}: no such datalist file or dataset folder")
    for name in DATALIST_NAMES:
        if (source / name).is_file():
            return source / name, _json_splits(source / name)
    try:
        folders = pair_folders(source)
        splits = {split: pair_items(images, masks) for split, (images, masks) in folders.items()}
    except LayoutError as error:
        raise SegmentationDataError(str(error)) from None
    if not folders:
        raise SegmentationDataError(f"{source}: not a dataset folder: it holds no {' or '.join(DATALIST_NAMES)} and "
                                    "no image/mask folders (imagesTr/ + labelsTr/, images/ + masks/ ...)")
    return None, splits


def dataset_splits(source: str | os.PathLike, validation_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """The splits of a dataset in one of the layouts of the module docstring, with absolute paths.

    Args:
        source: a datalist JSON file or a dataset folder.
        validation_fraction: share of ``training`` drawn as ``validation`` when the dataset has no validation split
            (0: none).
        seed: the seed of that draw.

    Raises:
        SegmentationDataError: naming the file or folder: no such file or folder, not a layout, unreadable JSON,
            an empty image folder, an image without a mask, a training split too small to draw from.
    """
    source = Path(source)
    datalist_file, splits = _layout_splits(source)
    if not splits:
        raise SegmentationDataError(f"{source}: the dataset holds no items")
    if "validation" not in splits and "training" in splits:
        try:
            splits["training"], splits["validation"] = draw_validation(splits["training"], validation_fraction, seed,
                                                                       str(source))
        except LayoutError as error:
            raise SegmentationDataError(str(error)) from None
        logger.info("%s: validation drawn from training: %d of %d items (validation_fraction %s, seed %d)", source,
                    len(splits["validation"]), len(splits["training"]) + len(splits["validation"]),
                    validation_fraction, seed)
    order = ["training", "validation", *(split for split in splits if split not in ("training", "validation"))]
    splits = {split: splits[split] for split in order if split in splits}
    kind = f"datalist {datalist_file.name}" if datalist_file else "image/mask folders"
    logger.info("%s (%s): %s", source, kind, ", ".join(f"{len(items)} {split}" for split, items in splits.items()))
    return DataSplits(source, splits, datalist_file)


def inference_items(source: str | os.PathLike, split: str, validation_fraction: float = 0.2,
                    seed: int = 0) -> list[dict]:
    """``[{"image": path}, ...]`` to segment: the images of a plain folder of images (:func:`folder_datalist`), or
    of ``split`` of a dataset (a datalist JSON or a dataset folder, :func:`dataset_splits`).

    Raises:
        SegmentationDataError: as :func:`folder_datalist` and :func:`dataset_splits`, naming the file or folder.
    """
    source = Path(source)
    is_dataset = source.is_file() or any((source / name).is_file() for name in DATALIST_NAMES)
    if source.is_dir() and not is_dataset:
        try:
            is_dataset = bool(pair_folders(source))
        except LayoutError as error:
            raise SegmentationDataError(str(error)) from None
    if not is_dataset:
        return folder_datalist(source)
    return [{"image": item["image"]} for item in dataset_splits(source, validation_fraction, seed)[split]]


def folder_datalist(folder: str | os.PathLike) -> list[dict]:
    """``[{"image": path}, ...]`` for the images of ``folder``, sorted by name: PNG/JPEG, NIfTI and DICOM files,
    and sub-folders holding DICOM files (each read as one series).

    Raises:
        SegmentationDataError: the folder is missing or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SegmentationDataError(f"input folder {folder} does not exist")
    items = [{"image": str(image)} for image in list_images(folder)]
    if not items:
        raise SegmentationDataError(f"input folder {folder} holds no PNG, JPEG, NIfTI or DICOM image")
    return items


def _header(item: Mapping, key: str, position: int):
    if key not in item:
        hint = (" (training and evaluation need a split with labels; an MSD test split has none)"
                if key == "label" else "")
        raise SegmentationDataError(f"datalist item {position} has no {key!r}: {dict(item)}{hint}")
    try:
        return read_header(item[key], channels_last=True)
    except ImageReadError as error:
        raise SegmentationDataError(f"{key} of datalist item {position}: {error}") from error


def check_items(items: Sequence[Mapping], in_channels: int, with_label: bool = True) -> list[dict]:
    """Checks every item's files by their headers and returns the items unchanged, as a list.

    An image may have ``in_channels`` channels, or 1 (repeated to ``in_channels``); a label must have one channel
    and the spatial shape of its image. 2D and 3D items may be mixed.

    Args:
        items: dicts with ``"image"`` (and ``"label"`` when ``with_label``) paths.
        in_channels: input channels of the network.
        with_label: whether items must have a label.

    Raises:
        SegmentationDataError: naming the item's file and its problem.
    """
    items = [dict(item) for item in items]
    if not items:
        raise SegmentationDataError("the datalist is empty")
    for position, item in enumerate(items):
        image = _header(item, "image", position)
        if image.channels not in (1, in_channels):
            raise SegmentationDataError(
                f"{image.path}: image has {image.channels} channels but the network takes in_channels={in_channels} "
                "(grey images are repeated to any channel count; set in_channels to the images' channel count)"
            )
        if not with_label:
            continue
        label = _header(item, "label", position)
        if label.channels != 1:
            raise SegmentationDataError(f"{label.path}: label has {label.channels} channels, expected one channel "
                                        "of class indices")
        if label.shape != image.shape:
            raise SegmentationDataError(f"{label.path}: label shape {label.shape} differs from the shape "
                                        f"{image.shape} of its image {image.path}")
    return items

"""Segmentation datalists: reading them, listing a folder of images, and checking every file before a run starts.

A run over hundreds of images should not fail at image 312 with a message from deep inside a reader. The checks
here read only headers (``scripts.data.readers.read_header``) and report the first bad item with its file:
missing or unreadable image or label, a label whose shape differs from its image's, a colour label, an image
whose channel count the network cannot take.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from monai.data import load_decathlon_datalist

from scripts.data.readers import ImageReadError, detect_format, read_header

__all__ = ["SegmentationDataError", "check_items", "folder_datalist", "read_split"]

_IMAGE_FORMATS = ("png", "jpeg", "nifti", "dicom")


class SegmentationDataError(ValueError):
    """A datalist item cannot be used for segmentation; the message names the file and the problem."""


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


def folder_datalist(folder: str | os.PathLike) -> list[dict]:
    """``[{"image": path}, ...]`` for the images of ``folder``, sorted by name: PNG/JPEG, NIfTI and DICOM files,
    and sub-folders holding DICOM files (each read as one series).

    Raises:
        SegmentationDataError: the folder is missing or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SegmentationDataError(f"input folder {folder} does not exist")
    items = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        is_series = entry.is_dir() and any(detect_format(f) == "dicom" for f in entry.iterdir() if f.is_file())
        if is_series or (entry.is_file() and detect_format(entry) in _IMAGE_FORMATS):
            items.append({"image": str(entry)})
    if not items:
        raise SegmentationDataError(f"input folder {folder} holds no PNG, JPEG, NIfTI or DICOM image")
    return items


def _header(item: Mapping, key: str, position: int):
    if key not in item:
        raise SegmentationDataError(f"datalist item {position} has no {key!r}: {dict(item)}")
    try:
        return read_header(item[key])
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

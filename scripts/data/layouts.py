"""The dataset layouts users bring, read into datalist items: folders of image/mask pairs, folders per class, and a
validation split drawn from the training items when a dataset has none.

Shared by the segmentation (``scripts.segmentation.datalist``) and classification
(``scripts.classification.datalist``) workflows. Nothing here writes anything; every problem raises
:class:`LayoutError` with a one-line message naming the folder or file.

**Image/mask pairs** (:func:`pair_folders`, :func:`pair_items`): image folders ``imagesTr``, ``imagesVal``,
``imagesTs`` (the Medical Segmentation Decathlon's names) or ``images``, each with its mask folder beside it,
``labelsTr``/``masksTr`` ... or ``labels``/``masks``. A mask belongs to the image with the same name once the
extensions are removed and, from the mask's name, one of the suffixes ``_mask``, ``_seg``, ``_segmentation``,
``_label`` (``a.jpg`` <- ``a.png``, ``a_mask.png``; ``case1.nii.gz`` <- ``case1.nii.gz``). Every image needs a
mask, except in the test folder (``imagesTs`` without ``labelsTs``).

**Folder per class** (:func:`class_folder_splits`): ``DIR/<class>/...`` with the images of each class anywhere
below its folder; or ``DIR/<split>/<class>/...`` with split folders ``train``/``training``, ``val``/``validation``
and ``test``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.data import partition_dataset

from scripts.data.readers import detect_format

__all__ = [
    "CLASS_SPLIT_FOLDERS",
    "MASK_SUFFIXES",
    "PAIR_SPLITS",
    "LayoutError",
    "class_folder_splits",
    "draw_validation",
    "image_stem",
    "list_images",
    "pair_folders",
    "pair_items",
]

logger = logging.getLogger(__name__)

MASK_SUFFIXES = ("_mask", "_seg", "_segmentation", "_label")
# split -> the suffixes of its image folders ("images" + suffix) and mask folders ("labels"/"masks" + suffix)
PAIR_SPLITS = {"training": ("Tr", ""), "validation": ("Val",), "test": ("Ts",)}
_MASK_FOLDERS = ("labels", "masks")
# split folder names of the folder-per-class layout -> split
CLASS_SPLIT_FOLDERS = {"train": "training", "training": "training", "val": "validation", "validation": "validation",
                       "test": "test"}
_EXTENSIONS = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".ima")


class LayoutError(ValueError):
    """A folder does not hold a readable dataset layout; the message names the folder or file and the problem."""


def image_stem(path: str | os.PathLike) -> str:
    """A file's name without its image extension (``a.nii.gz`` -> ``a``; a DICOM series folder keeps its name)."""
    name = Path(path).name
    for extension in _EXTENSIONS:
        if name.lower().endswith(extension):
            return name[: -len(extension)]
    return name


def _is_series(folder: Path) -> bool:
    return any(detect_format(entry) == "dicom" for entry in folder.iterdir() if entry.is_file())


def list_images(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """The images of ``folder``, sorted: PNG/JPEG, NIfTI and DICOM files (hidden files such as macOS ``._*``
    left out) and, unless ``recursive``, sub-folders holding DICOM files (each one series); with ``recursive``,
    the image files anywhere below ``folder``.

    Raises:
        LayoutError: ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LayoutError(f"{folder}: no such folder")
    if recursive:
        return sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith(".")
                      and detect_format(path) is not None)
    return [entry for entry in sorted(folder.iterdir()) if not entry.name.startswith(".")
            and ((entry.is_file() and detect_format(entry) is not None) or (entry.is_dir() and _is_series(entry)))]


def pair_folders(folder: str | os.PathLike) -> dict[str, tuple[Path, Path | None]]:
    """``{split: (image folder, mask folder or None)}`` of an image/mask pair layout (module docstring); empty when
    ``folder`` holds none of its image folders.

    Raises:
        LayoutError: two image folders for one split, or training/validation images without a mask folder.
    """
    folder = Path(folder)
    found: dict[str, tuple[Path, Path | None]] = {}
    for split, suffixes in PAIR_SPLITS.items():
        images = [folder / f"images{suffix}" for suffix in suffixes if (folder / f"images{suffix}").is_dir()]
        if len(images) > 1:
            raise LayoutError(f"{folder}: both {images[0].name}/ and {images[1].name}/ hold {split} images; keep one")
        if not images:
            continue
        suffix = images[0].name[len("images"):]
        masks = [folder / f"{name}{suffix}" for name in _MASK_FOLDERS if (folder / f"{name}{suffix}").is_dir()]
        if len(masks) > 1:
            raise LayoutError(f"{folder}: both {masks[0].name}/ and {masks[1].name}/ hold masks of {images[0].name}/")
        if not masks and split != "test":
            expected = " or ".join(f"{name}{suffix}/" for name in _MASK_FOLDERS)
            raise LayoutError(f"{images[0]}: no mask folder beside it (expected {expected})")
        found[split] = (images[0], masks[0] if masks else None)
    return found


def _mask_key(mask: Path) -> str:
    stem = image_stem(mask)
    for suffix in MASK_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def pair_items(image_dir: str | os.PathLike, mask_dir: str | os.PathLike | None) -> list[dict[str, str]]:
    """``[{"image": path, "label": path}, ...]`` (only ``"image"`` without ``mask_dir``) for the images of
    ``image_dir`` matched to the masks of ``mask_dir`` by name (module docstring), sorted by image name.

    Raises:
        LayoutError: the image folder holds no image, an image has no mask, or two masks match one image.
    """
    image_dir = Path(image_dir)
    images = list_images(image_dir)
    if not images:
        raise LayoutError(f"{image_dir}: holds no PNG, JPEG, NIfTI or DICOM image")
    if mask_dir is None:
        return [{"image": str(image)} for image in images]
    masks: dict[str, Path] = {}
    for mask in list_images(mask_dir):
        key = _mask_key(mask)
        if key in masks:
            raise LayoutError(f"{mask}: a second mask for the image named {key!r} (the other is {masks[key].name})")
        masks[key] = mask
    items = []
    for image in images:
        mask = masks.pop(image_stem(image), None)
        if mask is None:
            raise LayoutError(f"{image}: no mask in {mask_dir} (a mask has the image's name, optionally followed by "
                              f"{', '.join(MASK_SUFFIXES)}; any image extension)")
        items.append({"image": str(image), "label": str(mask)})
    if masks:
        logger.warning("%s: %d mask(s) without an image are not used, e.g. %s", mask_dir, len(masks),
                       next(iter(masks.values())).name)
    return items


def draw_validation(items: Sequence[Any], fraction: float, seed: int, where: str) -> tuple[list, list]:
    """(training, validation): a seeded random ``fraction`` of ``items`` held out for validation by MONAI's
    ``partition_dataset``, at least one item when ``fraction`` > 0 and one is left for training; the same
    ``seed`` always draws the same items. ``fraction`` 0, or a single item (with a warning), holds out nothing.

    Args:
        items: the training items.
        fraction: share of the items to hold out, in [0, 1).
        seed: the shuffle's seed.
        where: the dataset, for messages.

    Raises:
        LayoutError: ``fraction`` outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise LayoutError(f"{where}: validation_fraction must lie in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(items), []
    if len(items) < 2:
        logger.warning("%s: %d training item(s), none held out for validation (validation_fraction %s); add items or "
                       "a validation split to validate", where, len(items), fraction)
        return list(items), []
    held_out = min(len(items) - 1, max(1, round(fraction * len(items))))
    _, drawn = partition_dataset(list(range(len(items))), ratios=[len(items) - held_out, held_out], shuffle=True,
                                 seed=seed)
    drawn = set(drawn)  # both sides keep the items' order
    return ([item for index, item in enumerate(items) if index not in drawn],
            [item for index, item in enumerate(items) if index in drawn])


def _class_folders(folder: Path) -> dict[str, list[str]]:
    """``{class name: image paths}`` of ``folder/<class>/...``."""
    loose = [entry.name for entry in folder.iterdir() if entry.is_file() and not entry.name.startswith(".")
             and detect_format(entry) is not None]
    if loose:
        raise LayoutError(f"{folder}: image {loose[0]} lies outside a class folder (expected {folder}/<class>/...)")
    classes = {}
    for entry in sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith(".")):
        images = list_images(entry, recursive=True)
        if not images:
            raise LayoutError(f"{entry}: class folder holds no PNG, JPEG, NIfTI or DICOM image")
        classes[entry.name] = [str(image) for image in images]
    return classes


def class_folder_splits(folder: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """``{split: {class name: image paths}}`` of a folder-per-class layout (module docstring): one ``"training"``
    split for ``DIR/<class>/``, or the splits of ``DIR/<split>/<class>/``. Class names are the folder names.

    Raises:
        LayoutError: no such folder, images outside class folders, an empty class folder, fewer than two classes,
            split folders mixed with class folders, or a class of another split that training lacks.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LayoutError(f"{folder}: no such folder")
    subfolders = [entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    split_names = [name for name in subfolders if name.lower() in CLASS_SPLIT_FOLDERS]
    if split_names and len(split_names) < len(subfolders):
        other = sorted(set(subfolders) - set(split_names))[0]
        raise LayoutError(f"{folder / other}: neither a split folder ({', '.join(CLASS_SPLIT_FOLDERS)}) nor allowed "
                          f"beside the split folders {sorted(split_names)}")
    if not split_names:
        splits = {"training": _class_folders(folder)}
    else:
        splits = {}
        for name in sorted(split_names):
            split = CLASS_SPLIT_FOLDERS[name.lower()]
            if split in splits:
                raise LayoutError(f"{folder}: two folders hold the {split} split; keep one of "
                                  f"{[n for n in split_names if CLASS_SPLIT_FOLDERS[n.lower()] == split]}")
            splits[split] = _class_folders(folder / name)
        if "training" not in splits:
            raise LayoutError(f"{folder}: split folders {sorted(split_names)} but no train/ or training/")
    training = splits["training"]
    if len(training) < 2:
        raise LayoutError(f"{folder}: {len(training)} class folder(s) {sorted(training)}; classification needs at "
                          "least two (one sub-folder per class)")
    for split, classes in splits.items():
        unknown = sorted(set(classes) - set(training))
        if unknown:
            raise LayoutError(f"{folder}: the {split} split has class folder {unknown[0]!r}, which training lacks "
                              f"(classes {sorted(training)})")
    return splits

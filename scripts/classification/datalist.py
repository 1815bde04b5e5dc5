"""Classification datalists: labelled images in MONAI's datalist JSON layout, one built from a folder per class, and
one built from the embedded data.

A datalist is a JSON object::

    {
        "classes": ["discs", "rings", "stripes"],
        "training": [{"image": "phantoms/discs/discs_000.png", "label": "discs"}, ...],
        "validation": [{"image": "...", "label": "rings"}, ...],
        "test": [{"image": "..."}, ...]
    }

``classes`` fixes the order of the logits and of the probability columns written at inference. A ``label`` is
a class name or its index in ``classes``. Image paths are absolute or relative to the datalist's folder. Any
split name may be used; items of a split used for training or validation must have a label.
:func:`load_split` returns ``[{"image": absolute path, "label": class index, "class": class name}, ...]``,
checking that every file exists and every label is a known class, with errors naming the datalist, the item and
the bad value.

A folder per class (``DIR/<class>/*.png``, or ``DIR/train/<class>/...`` with ``val/`` and ``test/``; the rule is in
:mod:`scripts.data.layouts`) becomes such a datalist with :func:`class_folder_datalist`, written into the run's
output folder, never into ``DIR``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from scripts.atomic_save import write_atomically
from scripts.data.embedded import prepare_embedded_data
from scripts.data.layouts import LayoutError, class_folder_splits, list_images
from scripts.data.manifest import load_manifest
from scripts.data.sources import expand_entry

__all__ = [
    "class_folder_datalist",
    "class_names",
    "image_files",
    "label_index",
    "load_split",
    "prepare_embedded_classification",
    "read_datalist",
    "split_items",
    "split_stratified",
]

DATALIST_NAME = "classification_datalist.json"
MIN_IMAGES_PER_CLASS = 4


def read_datalist(path: str | Path) -> dict[str, Any]:
    """The datalist JSON object; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path}: no such file")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"datalist {path}: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise ValueError(f"datalist {path}: must be a JSON object with 'classes' and one list per split")
    return document


def class_names(datalist: str | Path) -> list[str]:
    """The ``classes`` of a datalist: distinct non-empty strings, at least two."""
    classes = read_datalist(datalist).get("classes")
    if (not isinstance(classes, list) or len(classes) < 2 or len(set(classes)) != len(classes)
            or not all(isinstance(name, str) and name.strip() for name in classes)):
        raise ValueError(f"datalist {datalist}: 'classes' must list at least two distinct class names, got {classes!r}")
    return classes


def label_index(label: object, classes: list[str], where: str) -> int:
    """The index of ``label`` (a class name, or an index) in ``classes``; ValueError naming ``where`` otherwise."""
    if isinstance(label, str) and label in classes:
        return classes.index(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(classes):
        return label
    raise ValueError(f"{where}: unknown class label {label!r}; expected one of {classes} or an index below {len(classes)}")


def split_items(datalist: str | Path, split: str) -> list[tuple[str, dict[str, Any], Path]]:
    """The items of ``split`` as (their position for messages, the item, its image's absolute path), after checking
    that the split is a non-empty list of objects with an ``image`` path that exists.

    Raises:
        FileNotFoundError: the datalist or an image does not exist (named).
        ValueError: the datalist is not a JSON object, the split is missing or empty, or an item is malformed.
    """
    datalist = Path(datalist)
    items = read_datalist(datalist).get(split)
    if not isinstance(items, list) or not items:
        raise ValueError(f"datalist {datalist}: split {split!r} must be a non-empty list of items")
    checked = []
    for number, item in enumerate(items):
        where = f"datalist {datalist}, {split}[{number}]"
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not item["image"].strip():
            raise ValueError(f"{where}: must be an object with an 'image' path, got {item!r}")
        image = Path(item["image"])
        image = image if image.is_absolute() else datalist.resolve().parent / image
        if not image.exists():
            raise FileNotFoundError(f"{where}: image {image} does not exist")
        checked.append((where, item, image))
    return checked


def load_split(datalist: str | Path, split: str, *, labelled: bool = True) -> list[dict[str, Any]]:
    """Items of one split, with absolute image paths and class indices (see the module docstring).

    Args:
        datalist: the datalist JSON file.
        split: the split's key, e.g. ``"training"``.
        labelled: every item must have a known ``label`` (training, validation); False allows items without one.

    Raises:
        FileNotFoundError: the datalist or one of its images does not exist (named).
        ValueError: the split is missing or empty, an item is malformed, or a label is unknown (named).
    """
    classes = class_names(datalist)
    result = []
    for where, item, image in split_items(datalist, split):
        entry: dict[str, Any] = {"image": str(image)}
        if "label" in item or labelled:
            if "label" not in item:
                raise ValueError(f"{where}: image {image} has no 'label'")
            index = label_index(item["label"], classes, f"{where} (image {image})")
            entry.update(label=index, **{"class": classes[index]})
        result.append(entry)
    return result


def image_files(folder: str | Path) -> list[dict[str, str]]:
    """Items ``{"image": path}`` for every image file (PNG, JPEG, NIfTI, DICOM) below ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {folder} does not exist")
    files = list_images(folder, recursive=True)
    if not files:
        raise ValueError(f"input folder {folder} holds no image files (.png, .jpg, .nii, .nii.gz, .dcm)")
    return [{"image": str(path)} for path in files]


def split_stratified(
    items_by_class: dict[str, list[str]], validation_fraction: float, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Training and validation items, each class split in the same proportion by a seeded shuffle.

    Every class keeps at least one image on each side; the same seed always gives the same split.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
    rng = np.random.default_rng(seed)
    training, validation = [], []
    for name in sorted(items_by_class):
        images = sorted(items_by_class[name])
        if len(images) < 2:
            raise ValueError(f"class {name!r} has {len(images)} image(s); a split needs at least 2")
        order = rng.permutation(len(images))
        held_out = min(len(images) - 1, max(1, math.ceil(validation_fraction * len(images))))
        validation += [{"image": images[i], "label": name} for i in sorted(order[:held_out])]
        training += [{"image": images[i], "label": name} for i in sorted(order[held_out:])]
    return training, validation


def prepare_embedded_classification(root: str | Path, *, validation_fraction: float = 0.25, seed: int = 0) -> Path:
    """Writes (if needed) the embedded data and a classification datalist over it; returns the datalist path.

    The classes are the labelled 2D sources of :func:`scripts.data.embedded.prepare_embedded_data` with at least
    :data:`MIN_IMAGES_PER_CLASS` images: the ``discs``, ``stripes`` and ``rings`` phantoms, 48 images each. The
    held-out ``validation`` split is a stratified ``validation_fraction`` chosen by ``seed``. The datalist is
    rewritten only when its content changes.
    """
    root = Path(root).resolve()
    manifest = prepare_embedded_data(root)
    items_by_class: dict[str, list[str]] = defaultdict(list)
    for entry in load_manifest(manifest):
        if entry.dimension == 2:
            items_by_class[entry.label] += [source.path.relative_to(root).as_posix() for source in expand_entry(entry)]
    items_by_class = {name: files for name, files in items_by_class.items() if len(files) >= MIN_IMAGES_PER_CLASS}
    training, validation = split_stratified(items_by_class, validation_fraction, seed)
    text = json.dumps({"classes": sorted(items_by_class), "training": training, "validation": validation}, indent=1)
    path = root / DATALIST_NAME
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return path


def class_folder_datalist(folder: str | Path, output_dir: str | Path, *, validation_fraction: float = 0.25,
                          seed: int = 0) -> Path:
    """Writes ``output_dir/datalist.json`` for a folder-per-class dataset and returns its path.

    Classes are the class folders' names, sorted; images keep their absolute paths, so nothing is written into
    ``folder``. Without a validation split folder, ``validation`` is a stratified ``validation_fraction`` of
    training drawn by ``seed`` (:func:`split_stratified`). The file is rewritten only when its content changes.

    Raises:
        LayoutError: the folder's layout is not a folder per class (the message names the folder or file), or a
            class has too few images to split.
    """
    folder = Path(folder).resolve()
    splits = class_folder_splits(folder)
    if "validation" in splits:
        training, validation = ([{"image": image, "label": name} for name, images in splits[split].items()
                                 for image in images] for split in ("training", "validation"))
    else:
        try:
            training, validation = split_stratified(splits["training"], validation_fraction, seed)
        except ValueError as error:
            raise LayoutError(f"{folder}: {error}") from None
    document = {"classes": sorted(splits["training"]), "training": training, "validation": validation}
    if "test" in splits:
        document["test"] = [{"image": image, "label": name} for name, images in splits["test"].items()
                            for image in images]
    text = json.dumps(document, indent=1)
    path = Path(output_dir) / "datalist.json"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return path

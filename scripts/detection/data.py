"""Detection datalists (images with boxes) and a small embedded synthetic detection dataset.

A detection datalist is a JSON object like a classification one (:mod:`scripts.classification.datalist`)
whose labelled items carry boxes::

    {
        "classes": ["lesion"],
        "training": [{"image": "images/train_000.png", "box": [[12, 30, 25, 41], ...], "label": ["lesion", ...]}],
        "validation": [...],
        "test": [{"image": "..."}]
    }

Boxes are ``[x_min, y_min, x_max, y_max]`` in pixels of the stored 2D image, **x along the columns (width), y
along the rows (height)**, with pixel edges as coordinates: a box covering columns 3-7 and rows 10-12 is
``[3, 10, 8, 13]``. This is the convention of COCO and torchvision; the transforms turn it into MONAI's
array-order boxes. An item may have no boxes (``"box": []``). :func:`load_detection_split` checks every file,
box and label, naming the datalist, the item and the bad value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from scripts.atomic_save import write_atomically
from scripts.classification.datalist import class_names, label_index, read_datalist, split_items
from scripts.data.readers import read_header

__all__ = ["class_names_or_single", "draw_detection_image", "load_detection_split", "prepare_embedded_detection"]

CLASSES = ("lesion",)


def _box(value: object, where: str) -> list[float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise ValueError(f"{where}: a box must be four finite numbers [x_min, y_min, x_max, y_max], got {value!r}")
    return [float(v) for v in value]


def load_detection_split(datalist: str | Path, split: str, *, labelled: bool = True) -> list[dict[str, Any]]:
    """Items ``{"image": absolute path, "box": [[x_min, y_min, x_max, y_max], ...], "label": [class index, ...]}``.

    Args:
        datalist: the datalist JSON file.
        split: the split's key, e.g. ``"training"``.
        labelled: every item must have ``box`` and ``label`` lists (training, validation); False (inference)
            allows items with the image only.

    Raises:
        FileNotFoundError: the datalist or an image does not exist (named).
        ValueError: a malformed item, a box that is not four numbers, is empty (max <= min) or lies outside the
            image, boxes and labels of different counts, or an unknown label; each names the file and the value.
    """
    classes = class_names_or_single(datalist)
    result = []
    for where, item, image in split_items(datalist, split):
        entry: dict[str, Any] = {"image": str(image)}
        if not labelled and "box" not in item:
            result.append(entry)
            continue
        where = f"{where} (image {image})"
        boxes, labels = item.get("box"), item.get("label")
        if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) != len(labels):
            raise ValueError(f"{where}: needs lists 'box' and 'label' of equal length, got box={boxes!r}, "
                             f"label={labels!r}")
        height, width = read_header(image).shape[:2]
        checked = []
        for box in boxes:
            x0, y0, x1, y1 = _box(box, where)
            if not (x1 > x0 and y1 > y0):
                raise ValueError(f"{where}: box {box} is empty (needs x_max > x_min and y_max > y_min)")
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                raise ValueError(f"{where}: box {box} lies outside the image of width {width} and height {height}")
            checked.append([x0, y0, x1, y1])
        entry.update(box=checked, label=[label_index(label, classes, where) for label in labels])
        result.append(entry)
    return result


def class_names_or_single(datalist: str | Path) -> list[str]:
    """The datalist's ``classes``; detection allows a single class (classification needs two)."""
    classes = read_datalist(datalist).get("classes")
    if isinstance(classes, list) and len(classes) == 1 and isinstance(classes[0], str) and classes[0].strip():
        return classes
    return class_names(datalist)


def draw_detection_image(rng: np.random.Generator, size: int, max_objects: int = 3) -> tuple[np.ndarray, list]:
    """A grey image (size, size) in [0, 1]: textured noise with 1 to ``max_objects`` bright discs or rectangles
    (sides 8 to size/4 px, not touching each other), and their boxes ``[x_min, y_min, x_max, y_max]``."""
    rows, cols = np.mgrid[0:size, 0:size]
    image = 0.2 + 0.05 * rng.standard_normal((size, size)) + 0.1 * np.sin(cols / rng.uniform(6, 20) + rng.uniform(0, 6))
    boxes: list[list[int]] = []
    wanted = int(rng.integers(1, max_objects + 1))
    for _ in range(100):
        if len(boxes) == wanted:
            break
        height, width = (int(v) for v in rng.integers(8, max(9, size // 4) + 1, 2))
        y0, x0 = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
        box = [x0, y0, x0 + width, y0 + height]
        if any(box[0] < b[2] + 2 and b[0] < box[2] + 2 and box[1] < b[3] + 2 and b[1] < box[3] + 2 for b in boxes):
            continue
        if rng.random() < 0.5:
            inside = (rows >= y0) & (rows < y0 + height) & (cols >= x0) & (cols < x0 + width)
        else:  # an ellipse touching the four sides of its box
            inside = (((rows + 0.5 - y0 - height / 2) / (height / 2)) ** 2
                      + ((cols + 0.5 - x0 - width / 2) / (width / 2)) ** 2) <= 1.0
        image[inside] = rng.uniform(0.6, 0.95) + 0.03 * rng.standard_normal(int(inside.sum()))
        boxes.append(box)
    return np.clip(image, 0.0, 1.0), boxes


def prepare_embedded_detection(
    root: str | Path, *, image_size: int = 64, training_images: int = 48, validation_images: int = 16, seed: int = 0
) -> Path:
    """Writes (if needed) a synthetic detection set under ``root`` and returns its datalist.

    Images are 8-bit PNGs from :func:`draw_detection_image`, one class ``lesion``; the held-out ``validation``
    split is drawn from its own seeded stream, so it never shares an image with ``training``. The same arguments
    always give the same files; the datalist is rewritten only when its content changes.
    """
    if image_size < 32 or training_images < 1 or validation_images < 1:
        raise ValueError(f"need image_size >= 32 and at least one image per split, got {image_size}, "
                         f"{training_images}, {validation_images}")
    root = Path(root).resolve()
    document: dict[str, Any] = {"classes": list(CLASSES)}
    for split, count, stream in (("training", training_images, 0), ("validation", validation_images, 1)):
        rng = np.random.default_rng([seed, stream, image_size])
        items = []
        for number in range(count):
            image, boxes = draw_detection_image(rng, image_size)
            path = root / "detection" / f"{split}_{image_size}px_{number:03d}.png"
            pixels = np.round(image * 255).astype(np.uint8)
            if not path.is_file():
                write_atomically(path, lambda temporary: Image.fromarray(pixels).save(temporary, format="PNG"))
            items.append({"image": path.relative_to(root).as_posix(), "box": boxes, "label": [CLASSES[0]] * len(boxes)})
        document[split] = items
    text = json.dumps(document, indent=1)
    datalist = root / f"detection_datalist_{image_size}px_seed{seed}.json"
    if not datalist.is_file() or datalist.read_text(encoding="utf-8") != text:
        write_atomically(datalist, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return datalist

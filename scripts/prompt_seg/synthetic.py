"""Embedded labelled data for box-prompted segmentation, drawn with fixed seeds at first run (no download).

:func:`prepare_prompt_seg_data` writes under a root folder, skipping files that already exist:

- ``images/case_NNN.png`` and ``labels/case_NNN.png``: 128 x 128 grey scans holding 3 to 5 overlapping objects
  (ellipses, rectangles, triangles, rings) of random brightness on a textured, shaded background with noise; the label
  (0/255) is one of the objects, chosen at random, so only the box prompt tells which object is wanted;
- ``datalist.json``: MONAI decathlon-style ``{"training": [...], "validation": [...]}`` lists of
  ``{"image", "label"}`` paths relative to the root (load with ``monai.data.load_decathlon_datalist``);
- ``test/images/*.png`` with ``test/images/boxes.json`` (tight boxes of the targets, as a user would give them) and
  ``test/labels/*.png``, for the inference config.

The datalist is written last, so an interrupted run leaves no datalist naming missing files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.atomic_save import write_atomically
from scripts.prompt_seg.boxes import box_from_mask

__all__ = ["prepare_prompt_seg_data"]

IMAGE_SIZE = 128
SPLITS = {"training": 128, "validation": 24, "test": 8}


def _shape_mask(kind: str, rng: np.random.RandomState) -> np.ndarray:
    """A random object of ``kind`` as a boolean (IMAGE_SIZE, IMAGE_SIZE) mask, at least 10 px across."""
    rows, cols = np.meshgrid(np.arange(IMAGE_SIZE), np.arange(IMAGE_SIZE), indexing="ij")
    cy, cx = rng.uniform(24, IMAGE_SIZE - 24, 2)
    ry, rx = rng.uniform(8, 26, 2)
    if kind == "rectangle":
        return (np.abs(rows - cy) <= ry) & (np.abs(cols - cx) <= rx)
    angle = rng.uniform(0, np.pi)
    u = (cols - cx) * np.cos(angle) + (rows - cy) * np.sin(angle)
    v = -(cols - cx) * np.sin(angle) + (rows - cy) * np.cos(angle)
    radius = (u / rx) ** 2 + (v / ry) ** 2
    if kind == "ellipse":
        return radius <= 1.0
    if kind == "ring":
        return (radius <= 1.0) & (radius >= 0.35)
    # triangle: three half-planes around the centre
    inside = np.ones_like(radius, dtype=bool)
    for k in range(3):
        theta = angle + 2 * np.pi * k / 3
        inside &= (cols - cx) * np.cos(theta) + (rows - cy) * np.sin(theta) <= 0.5 * max(rx, ry)
    return inside


def _scene(rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """(image in [0, 1], target mask) of one synthetic scan; the target is never hidden by 40% or more."""
    rows, cols = np.meshgrid(np.linspace(-1, 1, IMAGE_SIZE), np.linspace(-1, 1, IMAGE_SIZE), indexing="ij")
    gy, gx = rng.uniform(-0.15, 0.15, 2)
    image = 0.25 + gy * rows + gx * cols + 0.05 * np.sin(rng.uniform(2, 8) * rows + rng.uniform(0, 6))
    kinds = ("ellipse", "rectangle", "triangle", "ring")
    masks = [_shape_mask(kinds[rng.randint(len(kinds))], rng) for _ in range(rng.randint(3, 6))]
    for mask in masks:
        image[mask] = rng.uniform(0.45, 1.0) + 0.05 * rng.standard_normal()
    target = rng.randint(len(masks))
    visible = masks[target] & ~np.any(masks[target + 1 :], axis=0) if target + 1 < len(masks) else masks[target]
    if visible.sum() < 0.6 * masks[target].sum():  # mostly covered by later objects: take the top one
        visible = masks[-1]
    image = image + rng.normal(0.0, 0.04, image.shape)
    return np.clip(image, 0.0, 1.0), visible


def _write_png(array: np.ndarray, path: Path) -> None:
    if not path.exists():
        write_atomically(path, lambda temporary: Image.fromarray(array).save(temporary, format="PNG"))


def _write_text(path: Path, text_of: Callable[[], str]) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text_of()))


def prepare_prompt_seg_data(root: str | Path, seed: int = 0) -> Path:
    """Writes the embedded prompt-segmentation data under ``root`` (see the module docstring) and returns the path of
    its ``datalist.json``. Existing files are kept; the drawing is repeated so each case keeps its random state."""
    root = Path(root)
    rng = np.random.RandomState(seed)
    datalist: dict[str, list[dict[str, str]]] = {"training": [], "validation": []}
    test_boxes: dict[str, list[int]] = {}
    number = 0
    for split, count in SPLITS.items():
        for _ in range(count):
            image, mask = _scene(rng)
            name = f"case_{number:03d}.png"
            number += 1
            folder = root / "test" if split == "test" else root
            _write_png(np.round(image * 255).astype(np.uint8), folder / "images" / name)
            _write_png(mask.astype(np.uint8) * 255, folder / "labels" / name)
            if split == "test":
                test_boxes[name] = [int(v) for v in box_from_mask(mask)]
            else:
                datalist[split].append({"image": f"images/{name}", "label": f"labels/{name}"})
    _write_text(root / "test" / "images" / "boxes.json", lambda: json.dumps(test_boxes, indent=1))
    datalist_path = root / "datalist.json"
    _write_text(datalist_path, lambda: json.dumps(datalist, indent=1))
    return datalist_path

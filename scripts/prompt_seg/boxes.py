"""Box prompts: from masks (training) and from a JSON/CSV box file beside the images (inference).

Boxes are ``(x_min, y_min, x_max, y_max)`` in pixels of the image as stored, ``x`` the column and ``y`` the row, both
ends inclusive (SAM's/MedSAM's XYXY convention; a one-pixel object at row 5, column 7 has the box ``(7, 5, 7, 5)``).

Box files (``boxes.json`` or ``boxes.csv`` in the image folder unless named otherwise):

- JSON: ``{"case_001.png": [12, 30, 64, 80], "case_002.png": [[5, 5, 20, 20], [40, 40, 90, 70]]}``: one box or a list
  of boxes per image file name;
- CSV: a header ``image,x_min,y_min,x_max,y_max`` and one row per box (an image may have several rows).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from scripts.data.readers import detect_format

__all__ = [
    "BOX_FILE_NAMES",
    "BoxPromptError",
    "box_from_mask",
    "check_boxes_inside",
    "find_box_file",
    "inference_datalist",
    "read_box_file",
]

BOX_FILE_NAMES = ("boxes.json", "boxes.csv")
CSV_COLUMNS = ("image", "x_min", "y_min", "x_max", "y_max")


class BoxPromptError(ValueError):
    """A box prompt is missing, malformed, or does not fit its image; the message names the file."""


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Tight box (x_min, y_min, x_max, y_max) of the non-zero pixels of a 2D ``mask`` (H, W).

    Raises:
        ValueError: the mask is not 2D or has no foreground.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D (H, W), got shape {mask.shape}.")
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("mask has no foreground pixel: no box can be derived from it.")
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float32)


def _as_boxes(value: object, source: str) -> np.ndarray:
    boxes = np.asarray(value, dtype=np.float64)
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] == 0:
        raise BoxPromptError(f"{source}: expected one box [x_min, y_min, x_max, y_max] or a list of them, got {value!r}")
    if not np.isfinite(boxes).all():
        raise BoxPromptError(f"{source}: box coordinates must be finite numbers, got {value!r}")
    bad = boxes[(boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3])]
    if len(bad):
        raise BoxPromptError(f"{source}: box {bad[0].tolist()} has x_min > x_max or y_min > y_max")
    return boxes.astype(np.float32)


def read_box_file(path: str | Path) -> dict[str, np.ndarray]:
    """Image file name -> boxes (K, 4) from a JSON or CSV box file (format in the module docstring).

    Raises:
        BoxPromptError: the file is missing, unparsable, or a box is malformed (the message names file and entry).
    """
    path = Path(path)
    if not path.is_file():
        raise BoxPromptError(f"box file {path} does not exist")
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BoxPromptError(f"box file {path} is not valid JSON: {error}") from error
        if not isinstance(content, dict):
            raise BoxPromptError(f"box file {path} must hold an object of image name -> box(es), got {type(content).__name__}")
        return {str(name): _as_boxes(value, f"{path} entry {name!r}") for name, value in content.items()}
    if path.suffix.lower() == ".csv":
        grouped: dict[str, list[list[str]]] = {}
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or [f.strip() for f in reader.fieldnames] != list(CSV_COLUMNS):
                raise BoxPromptError(f"box file {path} must have the header {','.join(CSV_COLUMNS)}, got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                values = [row[column] for column in CSV_COLUMNS[1:]]
                try:
                    grouped.setdefault(row["image"].strip(), []).append([float(v) for v in values])
                except (TypeError, ValueError) as error:
                    raise BoxPromptError(f"box file {path} line {line}: coordinates must be numbers, got {values}") from error
        return {name: _as_boxes(rows, f"{path} image {name!r}") for name, rows in grouped.items()}
    raise BoxPromptError(f"box file {path} must end in .json or .csv")


def find_box_file(image_dir: str | Path) -> Path:
    """The one ``boxes.json`` or ``boxes.csv`` in ``image_dir``.

    Raises:
        BoxPromptError: neither or both exist.
    """
    found = [Path(image_dir) / name for name in BOX_FILE_NAMES if (Path(image_dir) / name).is_file()]
    if len(found) != 1:
        problem = "no box file" if not found else "both boxes.json and boxes.csv"
        raise BoxPromptError(f"{image_dir}: {problem}; put exactly one of {', '.join(BOX_FILE_NAMES)} beside the images "
                             "or give box_file")
    return found[0]


def inference_datalist(image_dir: str | Path, box_file: str | Path | None = None) -> list[dict]:
    """``[{"image": path, "boxes": (K, 4) array}, ...]`` for every 2D image file in ``image_dir``, sorted by name.

    Raises:
        BoxPromptError: the folder has no image, an image has no box, or the box file names an image that is not there.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise BoxPromptError(f"image folder {image_dir} does not exist")
    box_path = Path(box_file) if box_file is not None else find_box_file(image_dir)
    boxes = read_box_file(box_path)
    images = sorted(p for p in image_dir.iterdir() if p.is_file() and detect_format(p) is not None)
    if not images:
        raise BoxPromptError(f"image folder {image_dir} holds no image file (.png, .jpg, .nii, .nii.gz, .dcm)")
    missing = [p.name for p in images if p.name not in boxes]
    if missing:
        raise BoxPromptError(f"{box_path} has no box for {len(missing)} image(s) in {image_dir}: {', '.join(missing[:10])}")
    unknown = sorted(set(boxes) - {p.name for p in images})
    if unknown:
        raise BoxPromptError(f"{box_path} names image(s) not found in {image_dir}: {', '.join(unknown[:10])}")
    return [{"image": str(p), "boxes": boxes[p.name]} for p in images]


def check_boxes_inside(boxes: np.ndarray, image_shape: tuple[int, int], source: str) -> None:
    """Raises BoxPromptError naming ``source`` when a box leaves an image of ``image_shape`` (H, W)."""
    h, w = image_shape
    outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > w - 1) | (boxes[:, 3] > h - 1)
    if outside.any():
        raise BoxPromptError(
            f"{source}: box {boxes[outside][0].tolist()} lies outside the image of {h} rows x {w} columns "
            f"(x must be in [0, {w - 1}], y in [0, {h - 1}])"
        )

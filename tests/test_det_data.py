"""Synthetic detection data and detection datalists: deterministic, boxes on the objects, errors naming the value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.detection.data import load_detection_split, prepare_embedded_detection


def test_embedded_detection_set_is_deterministic_and_boxes_cover_bright_objects(tmp_path: Path) -> None:
    first = prepare_embedded_detection(tmp_path / "a", image_size=48, training_images=3, validation_images=2)
    second = prepare_embedded_detection(tmp_path / "b", image_size=48, training_images=3, validation_images=2)
    assert first.read_text() == second.read_text()
    training, validation = load_detection_split(first, "training"), load_detection_split(first, "validation")
    assert len(training) == 3 and len(validation) == 2
    assert {item["image"] for item in training}.isdisjoint(item["image"] for item in validation)
    for item in training + validation:
        pixels = np.asarray(Image.open(item["image"]), dtype=np.float64)
        assert 1 <= len(item["box"]) <= 3 and item["label"] == [0] * len(item["box"])
        for x0, y0, x1, y1 in item["box"]:
            assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
            centre = pixels[int((y0 + y1) / 2), int((x0 + x1) / 2)]
            assert centre > 2 * np.median(pixels)


def datalist(folder: Path, item: dict) -> Path:
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(folder / "scan.png")
    path = folder / "det.json"
    path.write_text(json.dumps({"classes": ["lesion"], "training": [{"image": "scan.png", **item}]}))
    return path


@pytest.mark.parametrize("item, message", [
    ({"box": [[0, 0, 31, 10]], "label": ["lesion"]}, r"scan\.png.*box \[0, 0, 31, 10\] lies outside the image of width 30 and height 20"),
    ({"box": [[-1, 0, 5, 5]], "label": [0]}, r"box \[-1, 0, 5, 5\] lies outside"),
    ({"box": [[5, 5, 5, 9]], "label": [0]}, r"box \[5, 5, 5, 9\] is empty"),
    ({"box": [[1, 2, 3]], "label": [0]}, r"four finite numbers"),
    ({"box": [[1, 2, 3, 4]], "label": ["polyp"]}, r"scan\.png.*unknown class label 'polyp'"),
    ({"box": [[1, 2, 3, 4]], "label": []}, r"equal length"),
])
def test_bad_boxes_and_labels_are_named(tmp_path: Path, item: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_detection_split(datalist(tmp_path, item), "training")


def test_missing_image_is_named_and_unlabelled_items_allowed_for_inference(tmp_path: Path) -> None:
    path = datalist(tmp_path, {})
    assert load_detection_split(path, "training", labelled=False)[0]["image"].endswith("scan.png")
    with pytest.raises(ValueError, match="needs lists 'box' and 'label'"):
        load_detection_split(path, "training")
    (tmp_path / "scan.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"scan\.png does not exist"):
        load_detection_split(path, "training", labelled=False)

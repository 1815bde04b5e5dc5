"""Box prompts, box files, data transforms and datalists of the box-prompted segmentation workflows."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from scripts.prompt_seg.boxes import BoxPromptError, box_from_mask, inference_datalist, read_box_file
from scripts.prompt_seg.datalist import load_prompt_seg_datalist
from scripts.prompt_seg.synthetic import SPLITS, prepare_prompt_seg_data
from scripts.prompt_seg.transforms import LoadImageLabeld, RandBoxPromptd, ScaleBoxesd


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def _mask(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[rows, cols] = 255
    return mask


def test_box_from_mask_is_tight_xyxy() -> None:
    mask = _mask((40, 60), slice(5, 11), slice(20, 31))
    np.testing.assert_array_equal(box_from_mask(mask), [20, 5, 30, 10])
    with pytest.raises(ValueError, match="no foreground"):
        box_from_mask(np.zeros((4, 4)))


def test_random_box_margins_stay_within_medsam_range_and_image() -> None:
    label = torch.as_tensor(_mask((128, 128), slice(40, 61), slice(50, 81)) > 0, dtype=torch.float32)[None]
    transform = RandBoxPromptd(max_margin=20, reference_size=256)
    transform.set_random_state(0)
    boxes = np.stack([transform({"label": label})["box"].numpy() for _ in range(200)])
    margins = (boxes - np.array([50, 40, 80, 60])) * np.array([-1, -1, 1, 1])
    assert margins.min() == 0 and margins.max() == 10  # 20 px at 256 is 10 px at 128, integers 0..10
    assert len(np.unique(margins)) == 11
    edge = torch.as_tensor(_mask((128, 128), slice(0, 10), slice(120, 128)) > 0, dtype=torch.float32)[None]
    box = transform({"label": edge})["box"].numpy()
    assert box[1] == 0 and box[2] == 127 and box[0] <= 120 and box[3] >= 9
    tight = RandBoxPromptd(max_margin=0)({"label": label})["box"].numpy()
    np.testing.assert_array_equal(tight, [50, 40, 80, 60])
    with pytest.raises(ValueError, match="case_7.png: mask has no foreground"):
        transform({"label": torch.zeros(1, 8, 8), "label_path": "case_7.png"})


def test_scale_boxes_maps_pixel_extents_and_rejects_boxes_outside() -> None:
    data = {"boxes": np.array([[0, 0, 99, 49], [10, 5, 19, 9]], dtype=np.float32),
            "original_shape": torch.tensor([50, 100]), "image_path": "scan.png"}
    scaled = ScaleBoxesd(spatial_size=200)(data)["boxes"].numpy()
    np.testing.assert_allclose(scaled, [[0, 0, 199, 199], [20, 20, 39, 39]])
    data["boxes"] = np.array([[0, 0, 100, 49]], dtype=np.float32)
    with pytest.raises(BoxPromptError, match=r"scan.png: box \[0.0, 0.0, 100.0, 49.0\] lies outside the image of 50 rows"):
        ScaleBoxesd(spatial_size=200)(data)


def test_box_files_json_and_csv(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_text(json.dumps({"a.png": [1, 2, 3, 4], "b.png": [[0, 0, 5, 5], [2, 2, 9, 9]]}))
    boxes = read_box_file(tmp_path / "b.json")
    assert boxes["a.png"].shape == (1, 4) and boxes["b.png"].shape == (2, 4)
    (tmp_path / "b.csv").write_text("image,x_min,y_min,x_max,y_max\na.png,1,2,3,4\na.png,5,6,7,8\n")
    np.testing.assert_array_equal(read_box_file(tmp_path / "b.csv")["a.png"], [[1, 2, 3, 4], [5, 6, 7, 8]])
    (tmp_path / "bad.csv").write_text("image,x_min,y_min,x_max,y_max\na.png,1,2,x,4\n")
    with pytest.raises(BoxPromptError, match="bad.csv line 2"):
        read_box_file(tmp_path / "bad.csv")
    (tmp_path / "flip.json").write_text(json.dumps({"a.png": [5, 2, 3, 4]}))
    with pytest.raises(BoxPromptError, match="flip.json entry 'a.png'.*x_min > x_max"):
        read_box_file(tmp_path / "flip.json")
    (tmp_path / "header.csv").write_text("name,x0,y0,x1,y1\n")
    with pytest.raises(BoxPromptError, match="header.csv must have the header"):
        read_box_file(tmp_path / "header.csv")


def test_inference_datalist_needs_one_box_file_and_a_box_for_every_image(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        _png(tmp_path / name, np.zeros((8, 8)))
    with pytest.raises(BoxPromptError, match="no box file"):
        inference_datalist(tmp_path)
    (tmp_path / "boxes.json").write_text(json.dumps({"a.png": [0, 0, 4, 4]}))
    with pytest.raises(BoxPromptError, match=r"boxes.json has no box for 1 image\(s\).*b.png"):
        inference_datalist(tmp_path)
    (tmp_path / "boxes.json").write_text(json.dumps({"a.png": [0, 0, 4, 4], "b.png": [1, 1, 2, 2], "c.png": [0, 0, 1, 1]}))
    with pytest.raises(BoxPromptError, match="names image.*not found.*c.png"):
        inference_datalist(tmp_path)
    (tmp_path / "boxes.json").write_text(json.dumps({"a.png": [0, 0, 4, 4], "b.png": [1, 1, 2, 2]}))
    items = inference_datalist(tmp_path)
    assert [Path(i["image"]).name for i in items] == ["a.png", "b.png"]
    (tmp_path / "boxes.csv").write_text("image,x_min,y_min,x_max,y_max\n")
    with pytest.raises(BoxPromptError, match="both boxes.json and boxes.csv"):
        inference_datalist(tmp_path)


def test_load_image_label_checks_channels_dimensions_and_emptiness(tmp_path: Path) -> None:
    image = _png(tmp_path / "img.png", np.random.RandomState(0).randint(0, 255, (20, 30)))
    label = _png(tmp_path / "lab.png", _mask((20, 30), slice(2, 5), slice(3, 9)))
    out = LoadImageLabeld()({"image": str(image), "label": str(label)})
    assert out["image"].shape == (3, 20, 30) and out["label"].shape == (1, 20, 30)
    assert set(out["label"].unique().tolist()) == {0.0, 1.0} and out["original_shape"].tolist() == [20, 30]
    colour = _png(tmp_path / "colour_label.png", np.zeros((20, 30, 3)))
    with pytest.raises(ValueError, match="colour_label.png: mask has 3 channels"):
        LoadImageLabeld()({"image": str(image), "label": str(colour)})
    empty = _png(tmp_path / "empty.png", np.zeros((20, 30)))
    with pytest.raises(ValueError, match="empty.png: mask is empty"):
        LoadImageLabeld()({"image": str(image), "label": str(empty)})
    small = _png(tmp_path / "small.png", np.zeros((10, 30)))
    with pytest.raises(ValueError, match="small.png: mask is 10 x 30 but its image .*img.png is 20 x 30"):
        LoadImageLabeld()({"image": str(image), "label": str(small)})
    volume = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), dtype=np.int16), np.eye(4)), volume)
    with pytest.raises(ValueError, match="vol.nii.gz: the image has spatial shape .*2D images"):
        LoadImageLabeld(label_key=None)({"image": str(volume)})


def test_embedded_data_and_datalist_skip_empty(tmp_path: Path) -> None:
    datalist = prepare_prompt_seg_data(tmp_path / "data")
    content = json.loads(datalist.read_text())
    assert len(content["training"]) == SPLITS["training"] and len(content["validation"]) == SPLITS["validation"]
    first = np.asarray(Image.open(tmp_path / "data" / content["training"][0]["label"]))
    assert first.any() and set(np.unique(first)) <= {0, 255}
    boxes = json.loads((tmp_path / "data" / "test" / "images" / "boxes.json").read_text())
    assert len(boxes) == SPLITS["test"]
    mtime = datalist.stat().st_mtime_ns
    assert prepare_prompt_seg_data(tmp_path / "data") == datalist and datalist.stat().st_mtime_ns >= mtime

    _png(tmp_path / "own" / "i1.png", np.ones((8, 8)))
    _png(tmp_path / "own" / "l1.png", _mask((8, 8), slice(1, 3), slice(1, 3)))
    _png(tmp_path / "own" / "l2.png", np.zeros((8, 8)))
    own = {"training": [{"image": "i1.png", "label": "l1.png"}, {"image": "i1.png", "label": "l2.png"}]}
    (tmp_path / "own" / "list.json").write_text(json.dumps(own))
    assert len(load_prompt_seg_datalist(tmp_path / "own" / "list.json")) == 2
    kept = load_prompt_seg_datalist(tmp_path / "own" / "list.json", skip_empty=True)
    assert [Path(i["label"]).name for i in kept] == ["l1.png"]
    with pytest.raises(ValueError, match="list.json.*validation"):
        load_prompt_seg_datalist(tmp_path / "own" / "list.json", "validation")
    own["training"].append({"image": "i1.png", "label": "gone.png"})
    (tmp_path / "own" / "list.json").write_text(json.dumps(own))
    with pytest.raises(ValueError, match="no existing 'label' file"):
        load_prompt_seg_datalist(tmp_path / "own" / "list.json")

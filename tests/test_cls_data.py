"""Classification datalists and image reading: splits, and errors naming the bad file or value."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from scripts.classification.datalist import class_names, image_files, load_split, split_stratified
from scripts.classification.transforms import ReadImage2Dd, read_image_2d
from scripts.data.readers import ImageReadError


def write_datalist(folder: Path, training: list, classes=("bright", "dark")) -> Path:
    path = folder / "datalist.json"
    path.write_text(json.dumps({"classes": list(classes), "training": training}))
    return path


def grey_png(path: Path, value: int = 200, size: int = 16) -> str:
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path.name


def test_load_split_resolves_paths_and_maps_names_and_indices(tmp_path: Path) -> None:
    a, b = grey_png(tmp_path / "a.png"), grey_png(tmp_path / "b.png", 10)
    datalist = write_datalist(tmp_path, [{"image": a, "label": "dark"}, {"image": b, "label": 0}])
    items = load_split(datalist, "training")
    assert [(Path(i["image"]).name, i["label"], i["class"]) for i in items] == [("a.png", 1, "dark"), ("b.png", 0, "bright")]
    assert class_names(datalist) == ["bright", "dark"]


@pytest.mark.parametrize("label", ["tumour", 2, -1, None])
def test_unknown_label_names_the_value_and_the_image(tmp_path: Path, label: object) -> None:
    datalist = write_datalist(tmp_path, [{"image": grey_png(tmp_path / "x.png"), "label": label}])
    with pytest.raises(ValueError, match=rf"x\.png.*unknown class label {label!r}"):
        load_split(datalist, "training")


def test_missing_image_and_missing_label_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_split(write_datalist(tmp_path, [{"image": "gone.png", "label": 0}]), "training")
    with pytest.raises(ValueError, match="x.png has no 'label'"):
        load_split(write_datalist(tmp_path, [{"image": grey_png(tmp_path / "x.png")}]), "training")
    assert "label" not in load_split(tmp_path / "datalist.json", "training", labelled=False)[0]
    with pytest.raises(ValueError, match="at least two distinct class names"):
        load_split(write_datalist(tmp_path, [{"image": "x.png", "label": 0}], classes=("only",)), "training")


def test_read_image_errors_name_the_file(tmp_path: Path) -> None:
    nan = np.zeros((16, 16), np.float32)
    nan[3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(ImageReadError, match=r"nan\.nii\.gz.*NaN"):
        read_image_2d(str(tmp_path / "nan.nii.gz"), 3)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ImageReadError, match=r"rgb\.png.*3 channels but the network takes 1"):
        read_image_2d(str(tmp_path / "rgb.png"), 1)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), np.float32), np.eye(4)), tmp_path / "volume.nii.gz")
    with pytest.raises(ImageReadError, match=r"volume\.nii\.gz.*3D image"):
        read_image_2d(str(tmp_path / "volume.nii.gz"), 3)
    with pytest.raises(ImageReadError, match="absent.png"):
        ReadImage2Dd("image")({"image": str(tmp_path / "absent.png")})


def test_grey_images_are_repeated_to_three_channels_in_unit_range(tmp_path: Path) -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(pixels).save(tmp_path / "ramp.png")
    image = ReadImage2Dd("image", channels=3)({"image": str(tmp_path / "ramp.png")})["image"]
    assert image.shape == (3, 16, 16) and image.dtype.is_floating_point
    np.testing.assert_allclose(image[2].numpy(), pixels / 255.0, atol=1e-6)
    assert [Path(item["image"]).name for item in image_files(tmp_path)] == ["ramp.png"]


def test_stratified_split_is_fixed_by_seed_disjoint_and_keeps_every_class() -> None:
    items = {"a": [f"a{i}" for i in range(10)], "b": [f"b{i}" for i in range(3)]}
    train, validation = split_stratified(items, 0.3, seed=1)
    assert split_stratified(items, 0.3, seed=1) == (train, validation)
    assert split_stratified(items, 0.3, seed=2) != (train, validation)
    names = lambda split: {item["image"] for item in split}  # noqa: E731
    assert names(train).isdisjoint(names(validation)) and len(names(train) | names(validation)) == 13
    assert {item["label"] for item in validation} == {"a", "b"} == {item["label"] for item in train}
    with pytest.raises(ValueError, match="class 'c' has 1 image"):
        split_stratified({"c": ["c0"], **items}, 0.3, seed=0)

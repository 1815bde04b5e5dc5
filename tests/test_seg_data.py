"""Segmentation data: embedded cases, datalist checks, balanced slice sampling and the custom transforms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom.data
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import RandCropByPosNegLabeld
from PIL import Image

from scripts.segmentation.datalist import SegmentationDataError, check_items, folder_datalist, read_split
from scripts.segmentation.embedded import LABEL_NAMES, prepare_segmentation_data
from scripts.segmentation.transforms import AsVolumed, MatchChannelsd, SliceBalanceIndicesd, ValidateLabeld

CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="module")
def data_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(prepare_segmentation_data(tmp_path_factory.mktemp("seg")))


@pytest.fixture(scope="module")
def data_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(prepare_segmentation_data(tmp_path_factory.mktemp("seg"), volumetric=True))


def test_embedded_2d_cases_are_labelled_png_pairs_and_written_once(data_2d: Path) -> None:
    datalist = json.loads((data_2d / "datalist.json").read_text())
    assert datalist["labels"] == LABEL_NAMES
    assert [len(datalist[split]) for split in ("training", "validation", "test")] == [24, 8, 8]
    image = np.asarray(Image.open(data_2d / datalist["training"][0]["image"]))
    label = np.asarray(Image.open(data_2d / datalist["training"][0]["label"]))
    assert image.shape == label.shape and image.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1, 2} and len(np.unique(label)) > 1
    # the label is the object's intensity level: bright objects are brighter than dim ones
    assert image[label == 2].mean() > image[label == 1].mean() > image[label == 0].mean()
    stamp = (data_2d / "datalist.json").stat().st_mtime_ns
    assert prepare_segmentation_data(data_2d.parent) == str(data_2d)
    assert (data_2d / "datalist.json").stat().st_mtime_ns == stamp


def test_embedded_3d_cases_have_empty_slices_and_a_real_affine(data_3d: Path) -> None:
    item = read_split(data_3d / "datalist.json", "training")[0]
    image, label = nib.load(item["image"]), nib.load(item["label"])
    assert image.shape == label.shape == (64, 64, 36)
    np.testing.assert_allclose(image.affine, label.affine)
    assert image.affine[2, 2] == 2.0
    foreground_slices = (np.asarray(label.dataobj) > 0).any(axis=(0, 1))
    assert 0 < foreground_slices.sum() < 36


def test_read_split_makes_paths_absolute_and_names_a_missing_split(data_2d: Path, tmp_path: Path) -> None:
    items = read_split(data_2d / "datalist.json", "validation")
    assert all(Path(item["image"]).is_file() and Path(item["label"]).is_file() for item in items)
    with pytest.raises(SegmentationDataError, match="cannot read split 'testing'"):
        read_split(data_2d / "datalist.json", "testing")
    with pytest.raises(SegmentationDataError, match="nothing.json does not exist"):
        read_split(tmp_path / "nothing.json", "training")


def test_check_items_names_the_bad_file(data_2d: Path, data_3d: Path, tmp_path: Path) -> None:
    good = read_split(data_2d / "datalist.json", "training")[:2]
    assert check_items(good, in_channels=1) == good
    missing = [{"image": str(tmp_path / "gone.png"), "label": good[0]["label"]}]
    with pytest.raises(SegmentationDataError, match="gone.png"):
        check_items(missing, in_channels=1)
    volume = read_split(data_3d / "datalist.json", "training")[0]
    mismatch = [{"image": good[0]["image"], "label": volume["label"]}]
    with pytest.raises(SegmentationDataError, match=r"case_000.nii.gz: label shape \(64, 64, 36\) differs"):
        check_items(mismatch, in_channels=1)
    colour = tmp_path / "colour.png"
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(colour)
    with pytest.raises(SegmentationDataError, match="colour.png: image has 3 channels but the network takes in_chan"):
        check_items([{"image": str(colour), "label": good[0]["label"]}], in_channels=1)
    with pytest.raises(SegmentationDataError, match="colour.png: label has 3 channels"):
        check_items([{"image": good[0]["image"], "label": str(colour)}], in_channels=1)
    with pytest.raises(SegmentationDataError, match="has no 'label'"):
        check_items([{"image": good[0]["image"]}], in_channels=1)
    assert check_items([{"image": good[0]["image"]}], in_channels=3, with_label=False)


def test_folder_datalist_lists_images_and_dicom_series(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b.png")
    shutil.copy(CT_SMALL, tmp_path / "a.dcm")
    (tmp_path / "series").mkdir()
    shutil.copy(CT_SMALL, tmp_path / "series" / "slice1.dcm")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [Path(item["image"]).name for item in folder_datalist(tmp_path)] == ["a.dcm", "b.png", "series"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegmentationDataError, match="empty holds no PNG"):
        folder_datalist(tmp_path / "empty")


def test_slice_balance_draws_foreground_and_empty_slices_equally() -> None:
    label = torch.zeros(1, 8, 8, 20)
    label[0, 2:5, 2:5, 3] = 1  # one small foreground slice
    label[0, :, :, 10:12] = 2  # two slices full of foreground
    data = SliceBalanceIndicesd("label")({"image": torch.arange(20.0).expand(1, 8, 8, 20).clone(), "label": label})
    crop = RandCropByPosNegLabeld(["image", "label"], "label", spatial_size=[-1, -1, 1], num_samples=600,
                                  fg_indices_key="fg_slices", bg_indices_key="bg_slices")
    crop.set_random_state(0)
    slices = [int(sample["image"][0, 0, 0, 0]) for sample in crop(data)]
    counts = np.bincount(slices, minlength=20)
    assert counts[[3, 10, 11]].sum() == pytest.approx(300, abs=60)
    # every foreground slice equally often, whatever its foreground area
    assert counts[3] == pytest.approx(counts[10], rel=0.3)
    empty = [index for index in range(20) if index not in (3, 10, 11)]
    assert (counts[empty] > 0).all()


def test_slice_balance_of_a_single_slice_image_uses_that_slice() -> None:
    label = torch.ones(1, 6, 6, 1)
    data = SliceBalanceIndicesd("label")({"label": label})
    assert list(data["fg_slices"]) == list(data["bg_slices"]) == [np.ravel_multi_index((3, 3, 0), (6, 6, 1))]


def test_as_volume_adds_a_unit_slice_axis_with_a_3d_affine() -> None:
    image = MetaTensor(torch.rand(1, 5, 7), affine=torch.diag(torch.tensor([2.0, 3.0, 1.0])))
    volume = AsVolumed("image")({"image": image})["image"]
    assert volume.shape == (1, 5, 7, 1)
    torch.testing.assert_close(volume.affine, torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])).double())
    first = AsVolumed("image", slice_axis=0)({"image": image})["image"]
    assert first.shape == (1, 1, 5, 7)
    # the new first axis is the unit world z; the image axes keep their world directions and spacings
    expected = torch.tensor([[0.0, 2, 0, 0], [0, 0, 3, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(first.affine, expected)
    unchanged = torch.rand(1, 5, 7, 3)
    assert AsVolumed("image")({"image": unchanged})["image"] is unchanged


def test_match_channels_repeats_grey_drops_alpha_and_names_a_bad_file() -> None:
    grey = MetaTensor(torch.rand(1, 4, 4), meta={"filename_or_obj": "grey.png"})
    assert torch.equal(MatchChannelsd("image", 3)({"image": grey})["image"][2], grey[0])
    assert MatchChannelsd("image", 3)({"image": torch.rand(4, 4, 4)})["image"].shape[0] == 3
    two = MetaTensor(torch.rand(2, 4, 4), meta={"filename_or_obj": "two.nii.gz"})
    with pytest.raises(ValueError, match="two.nii.gz: image has 2 channels but the network takes in_channels=3"):
        MatchChannelsd("image", 3)({"image": two})


def test_validate_label_rejects_values_shapes_and_channels_naming_the_file() -> None:
    image = MetaTensor(torch.rand(1, 4, 4, 2), meta={"filename_or_obj": "img.nii.gz"})

    def label(values: torch.Tensor) -> MetaTensor:
        return MetaTensor(values, meta={"filename_or_obj": "lab.nii.gz"})

    check = ValidateLabeld("label", image_key="image", num_classes=3)
    check({"image": image, "label": label(torch.full((1, 4, 4, 2), 2.0))})
    with pytest.raises(ValueError, match=r"lab.nii.gz: label values must be integers in \[0, 3\), found \[0.0, 3.0\]"):
        check({"image": image, "label": label(torch.tensor([0.0, 3.0]).repeat(16).reshape(1, 4, 4, 2))})
    with pytest.raises(ValueError, match="lab.nii.gz: label shape .* differs from the shape .* img.nii.gz"):
        check({"image": image, "label": label(torch.zeros(1, 4, 4, 3))})
    with pytest.raises(ValueError, match="lab.nii.gz: label has 2 channels"):
        check({"image": image, "label": label(torch.zeros(2, 4, 4, 2))})

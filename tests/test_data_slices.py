"""Tests for the pretraining dataset (scripts/data/slices.py), modality balancing (scripts/data/balance.py), the
embedded data (scripts/data/embedded.py) and the manifest tools (scripts/make_manifest.py, manifest_report.py)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Resize, SpatialCrop
from PIL import Image
from pydicom.data import get_testdata_file
from torch.utils.data import DataLoader

from scripts import make_manifest, manifest_report
from scripts.data import slices
from scripts.data.balance import ModalityBalancedDataset, balanced_indices
from scripts.data.embedded import prepare_embedded_data
from scripts.data.intensity import normalise_intensity
from scripts.data.manifest import SourceDataset, load_manifest
from scripts.data.readers import ImageReadError
from scripts.data.slices import PretrainSliceDataset
from scripts.transforms.two_view import TwoViewAugmentd

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
CT_SMALL = Path(get_testdata_file("CT_small.dcm", download=False))
CT_SERIES = Path(get_testdata_file("DICOMDIR", download=False)).parent / "98892001" / "CT5N"
EMBEDDED_COUNTS = {"discs": 48, "stripes": 48, "rings": 48, "ct-phantom": 64, "mri-phantom": 64, "CT": 6, "MRI": 26}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_embedded_data(tmp_path_factory.mktemp("embedded"))


@pytest.fixture(scope="module")
def embedded_dataset(embedded: Path) -> PretrainSliceDataset:
    return PretrainSliceDataset(embedded, cache_size=16)


def save_nifti(path: Path, volume: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return path


# --- embedded data ----------------------------------------------------------------------------------------

def test_embedded_data_is_idempotent_and_small(embedded: Path) -> None:
    root = embedded.parent
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}
    assert sum(len(data) for _, data in files.values()) < 20 * 2**20
    assert not [p for p in files if p.name.startswith(".")]  # no temporary file left behind
    disc = root / "phantoms" / "discs" / "discs_007.png"
    disc.unlink()
    assert prepare_embedded_data(root) == embedded
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file() and p != disc} == {
        p: v for p, v in files.items() if p != disc}
    assert disc.read_bytes() == files[disc][1]  # regenerated identically: fixed seeds
    entries = load_manifest(embedded)
    assert {e.name for e in entries} == {
        "pydicom-CT_small", "pydicom-MR_small", "pydicom-ct-series", "nibabel-anatomical", "phantom-discs",
        "phantom-stripes", "phantom-rings", "ct-phantom", "mri-phantom"}
    assert not [d for d in json.loads(embedded.read_text())["datasets"] if Path(d["path"]).is_absolute()]


def test_embedded_data_indexes_without_skips(embedded_dataset: PretrainSliceDataset) -> None:
    dataset = embedded_dataset
    assert dataset.skipped == [] and len(dataset) == 304
    labels = Counter(dataset[i]["label"] for i in range(len(dataset)))
    assert labels == EMBEDDED_COUNTS
    assert Counter(dataset.modalities) == {"MRI": 90, "CT": 70, "X-ray": 48, "ultrasound": 48, "colour": 48}
    for i in range(len(dataset)):
        sample = dataset[i]
        image = sample["image"]
        assert set(sample) == {"image", "modality", "label", "source", "slice"}
        assert type(image) is torch.Tensor and image.dtype == torch.float32 and image.ndim == 3
        assert image.shape[0] == (3 if sample["label"] == "rings" else 1)
        assert 0 <= image.min() and image.max() <= 1 and image.max() > image.min()
        assert Path(sample["source"]).exists()


def test_samples_feed_two_view_augmentation(embedded: Path) -> None:
    dataset = PretrainSliceDataset(embedded, TwoViewAugmentd(spatial_size=32, drop_source=True))
    batch = next(iter(DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert batch["view1"].shape == batch["view2"].shape == (8, 3, 32, 32)
    assert len(batch["label"]) == 8 and batch["slice"].shape == (8,)


# --- slicing, foreground, cache ---------------------------------------------------------------------------

def test_slices_along_each_axis() -> None:
    volume = nib.load(ANATOMICAL).get_fdata()
    normalised = normalise_intensity(volume, "MRI")
    for axis in (0, 1, 2):
        dataset = PretrainSliceDataset([SourceDataset("anat", ANATOMICAL, "MRI", 3, slice_axis=axis)])
        assert len(dataset) == volume.shape[axis]
        for k in (0, volume.shape[axis] // 2, volume.shape[axis] - 1):
            sample = dataset[k]
            assert sample["slice"] == k and sample["source"] == str(ANATOMICAL)
            np.testing.assert_array_equal(sample["image"][0].numpy(), np.take(normalised, k, axis=axis))


def test_min_foreground_skips_near_empty_slices(tmp_path: Path) -> None:
    volume = np.zeros((16, 16, 10), dtype=np.float32)
    volume[4:12, 4:12, 3:7] = 100.0  # 25% of each of slices 3..6
    volume[0, 0, 8] = 100.0  # one pixel: below the threshold
    entry = SourceDataset("v", save_nifti(tmp_path / "v.nii.gz", volume), "MRI", 3)
    assert len(PretrainSliceDataset([entry])) == 10
    kept = PretrainSliceDataset([entry], min_foreground=0.1)
    assert [kept[i]["slice"] for i in range(len(kept))] == [3, 4, 5, 6]


def test_volumes_are_read_lazily_through_an_lru_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    read_image = slices.read_image
    monkeypatch.setattr(slices, "read_image", lambda source: reads.append(source.path.name) or read_image(source))
    entries = [SourceDataset(name, shutil.copy(ANATOMICAL, tmp_path / f"{name}.nii"), "MRI", 3) for name in "ab"]
    dataset = PretrainSliceDataset(entries, cache_size=1)
    assert reads == [] and len(dataset) == 50  # headers only at construction
    for i in (0, 1, 24, 25, 26, 0):
        dataset[i]
    assert reads == ["a.nii", "b.nii", "a.nii"]
    uncached = PretrainSliceDataset(entries, cache_size=0)
    uncached[0], uncached[1]
    assert reads[3:] == ["a.nii", "a.nii"]


# --- bad files: found at construction, skipped or raised ---------------------------------------------------

BAD_CASES = ["missing file", "empty glob", "DICOM without pixel data", "truncated NIfTI", "4D", "empty volume",
             "3D in a 2D dataset"]


def _bad_entries(root: Path) -> dict[str, tuple[SourceDataset, Path, str]]:
    """name: (entry, the path the error names, fragment of the reason)."""
    root.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(CT_SMALL)
    del ds.PixelData
    ds.save_as(root / "no_pixels.dcm")
    truncated = root / "cut.nii"
    truncated.write_bytes(ANATOMICAL.read_bytes()[:30_000])
    four_d = shutil.copy(Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz", root / "4d.nii.gz")
    empty = save_nifti(root / "empty.nii.gz", np.zeros((0, 8, 8), np.float32))
    flat = save_nifti(root / "flat" / "flat.nii.gz", np.ones((8, 8, 4), np.float32))
    return {
        "missing file": (SourceDataset("missing", root / "absent.nii.gz", "MRI", 3), root / "absent.nii.gz",
                         "no such file or folder"),
        "empty glob": (SourceDataset("glob", root / "none" / "*.png", "other", 2), root / "none" / "*.png",
                       "matches no files"),
        "DICOM without pixel data": (SourceDataset("nopix", root / "no_pixels.dcm", "CT", 2), root / "no_pixels.dcm",
                                     "no pixel data"),
        "truncated NIfTI": (SourceDataset("cut", truncated, "MRI", 3), truncated, "truncated NIfTI"),
        "4D": (SourceDataset("4d", four_d, "MRI", 3), four_d, "4D image"),
        "empty volume": (SourceDataset("empty", empty, "MRI", 3), empty, "empty image"),
        "3D in a 2D dataset": (SourceDataset("flat", root / "flat", "MRI", 2), flat, "3D image of shape (8, 8, 4)"),
    }


def test_bad_entries_are_skipped_with_reasons(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = _bad_entries(tmp_path)
    good = SourceDataset("good", CT_SMALL, "CT", 2)
    dataset = PretrainSliceDataset([good, *(entry for entry, _, _ in bad.values())])
    assert len(dataset) == 1 and dataset.dataset_names == ["good"]
    assert len(dataset.skipped) == len(bad) == len(BAD_CASES)
    for (_, path, fragment), (skipped_path, reason) in zip(bad.values(), dataset.skipped):
        assert skipped_path == str(path) and fragment in reason
        assert f"skipping {path}: {reason}" in caplog.text


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_entries_raise_on_request(tmp_path: Path, case: str) -> None:
    entry, path, fragment = _bad_entries(tmp_path)[case]
    with pytest.raises(ImageReadError) as caught:
        PretrainSliceDataset([SourceDataset("good", CT_SMALL, "CT", 2), entry], on_error="raise")
    assert caught.value.path == path and str(path) in str(caught.value) and fragment in str(caught.value)


def test_nan_images_found_by_verify_data_or_when_read(tmp_path: Path) -> None:
    volume = np.ones((8, 8, 3), np.float32)
    volume[2, 3, 1] = np.nan
    entry = SourceDataset("nan", save_nifti(tmp_path / "nan.nii.gz", volume), "MRI", 3)
    lazy = PretrainSliceDataset([entry])
    assert len(lazy) == 3 and lazy.skipped == []
    with pytest.raises(ImageReadError, match=r"nan\.nii\.gz: 1 NaN or Inf value"):
        lazy[0]
    checked = PretrainSliceDataset([entry, SourceDataset("good", CT_SMALL, "CT", 2)], verify_data=True)
    assert len(checked) == 1 and checked.skipped == [(str(entry.path), "1 NaN or Inf value(s) in an image of "
                                                                       "shape (8, 8, 3)")]
    with pytest.raises(ImageReadError, match="NaN"):
        PretrainSliceDataset([entry], verify_data=True, on_error="raise")


def test_dataset_arguments_are_checked(embedded: Path) -> None:
    with pytest.raises(ValueError, match="on_error must be 'skip' or 'raise'"):
        PretrainSliceDataset(embedded, on_error="ignore")
    with pytest.raises(ValueError, match="min_foreground"):
        PretrainSliceDataset(embedded, min_foreground=2.0)


# --- modality balancing -----------------------------------------------------------------------------------

def test_balanced_indices_equalise_modalities() -> None:
    modalities = ["CT"] * 7 + ["MRI"] * 3 + ["US"]
    indices = balanced_indices(modalities, seed=1)
    assert indices[:11] == list(range(11))
    assert Counter(modalities[i] for i in indices) == {"CT": 7, "MRI": 7, "US": 7}
    mri_copies = Counter(i for i in indices if modalities[i] == "MRI")
    assert sorted(mri_copies.values()) == [2, 2, 3]  # spread evenly: 7 = 2 + 2 + 3
    assert balanced_indices(modalities, seed=1) == indices != balanced_indices(modalities, seed=2)
    assert balanced_indices([], seed=0) == []


def test_balanced_dataset_crops_duplicates_only(embedded_dataset: PretrainSliceDataset) -> None:
    base = embedded_dataset
    balanced = ModalityBalancedDataset(base, crop_fraction=(0.5, 0.9), seed=3)
    assert len(balanced) == 5 * 90
    assert Counter(balanced.modalities) == {m: 90 for m in ("MRI", "CT", "X-ray", "ultrasound", "colour")}
    for i in (0, 150, len(base) - 1):
        assert torch.equal(balanced[i]["image"], base[i]["image"])  # originals untouched
    shares = []
    for i in range(len(base), len(balanced), 7):
        sample, original = balanced[i], base[balanced.indices[i]]
        assert sample["image"].shape == original["image"].shape and sample["label"] == original["label"]
        height, width = original["image"].shape[1:]
        top, left, h, w = balanced.crop_box(i, height, width)
        shares.append(h * w / (height * width))
        expected = Resize((height, width), mode="bilinear", align_corners=False)(
            SpatialCrop(roi_start=(top, left), roi_end=(top + h, left + w))(original["image"]))
        torch.testing.assert_close(sample["image"], torch.as_tensor(expected))
        assert torch.equal(sample["image"], balanced[i]["image"])  # deterministic per index
    large = [s for i, s in zip(range(len(base), len(balanced), 7), shares)
             if min(base[balanced.indices[i]]["image"].shape[1:]) >= 64]
    assert 0.45 < min(large) and max(large) < 0.95 and max(large) - min(large) > 0.2
    again = ModalityBalancedDataset(base, seed=3)
    assert again.indices == balanced.indices and torch.equal(again[400]["image"], balanced[400]["image"])


def test_balanced_dataset_arguments(embedded_dataset: PretrainSliceDataset) -> None:
    with pytest.raises(ValueError, match="crop_fraction"):
        ModalityBalancedDataset(embedded_dataset, crop_fraction=(0.9, 0.5))
    with pytest.raises(ValueError, match="got 2 modalities for 304 samples"):
        ModalityBalancedDataset(embedded_dataset, modalities=["CT", "MRI"])
    views = ModalityBalancedDataset(embedded_dataset, transform=TwoViewAugmentd(spatial_size=16, drop_source=True))
    assert views[len(embedded_dataset)]["view1"].shape == (3, 16, 16)


# --- make_manifest and manifest_report --------------------------------------------------------------------

def _scanned_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for folder, count in (("photos/skin", 3), ("mixed", 2)):
        (root / folder).mkdir(parents=True)
        for k in range(count):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / folder / f"{k}.png")
    shutil.copytree(CT_SERIES, root / "dicom" / "series")  # extensionless files of one CT series
    (root / "dicom" / "single").mkdir()
    shutil.copy(CT_SMALL, root / "dicom" / "single" / "ct.dcm")
    (root / "mri").mkdir()
    shutil.copy(ANATOMICAL, root / "mri" / "anat.nii")
    save_nifti(root / "mixed" / "vol.nii.gz", rng.normal(size=(12, 12, 6)).astype(np.float32))
    save_nifti(root / "flat" / "a.nii.gz", rng.normal(size=(12, 12, 1)).astype(np.float32))
    save_nifti(root / ".hidden" / "b.nii.gz", rng.normal(size=(12, 12, 1)).astype(np.float32))
    (root / "mri" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_make_manifest_round_trip(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = _scanned_tree(tmp_path / "tree")
    output = tmp_path / f"manifest{suffix}"
    assert make_manifest.main([str(root), "--output", str(output), "--modality", "photos=colour",
                               "--modality", "photos/skin=dermoscopy"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 7 dataset(s) to {output}" in printed
    entries = {e.name: e for e in load_manifest(output)}
    summary = {name: (e.modality, e.dimension, e.format) for name, e in entries.items()}
    assert summary == {
        "dicom/series": ("CT", 3, "dicom-series"),
        "dicom/single": ("CT", 2, "dicom"),
        "flat": ("other", 2, "nifti"),
        "mixed:nifti": ("other", 3, "nifti"),
        "mixed:png": ("other", 2, "png"),
        "mri": ("MRI", 3, "nifti"),  # by its folder's name
        "photos/skin": ("dermoscopy", 2, "png"),
    }
    assert entries["mri"].path == (root / "mri" / "*").resolve()
    dataset = PretrainSliceDataset(output)
    assert dataset.skipped == []
    assert Counter(dataset.dataset_names) == {"dicom/series": 5, "dicom/single": 1, "flat": 1, "mixed:nifti": 6,
                                              "mixed:png": 2, "mri": 25, "photos/skin": 3}


def test_make_manifest_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert make_manifest.main([str(tmp_path / "absent"), "--output", str(tmp_path / "m.json")]) == 2
    assert "absent: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert make_manifest.main([str(tmp_path / "empty"), "--output", str(tmp_path / "m.json")]) == 2
    assert "no image files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_manifest.main([str(tmp_path), "--modality", "x=sonar"])
    assert "unknown modality 'sonar'" in capsys.readouterr().err


def test_manifest_report_prints_counts_and_skipped(
    embedded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = json.loads(embedded.read_text())
    manifest["datasets"] = [{**d, "path": str(embedded.parent / d["path"])} for d in manifest["datasets"]]
    manifest["datasets"].append({"name": "lost", "path": str(tmp_path / "lost.nii"), "modality": "PET",
                                 "dimension": 3})
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    assert manifest_report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("304 samples from 10 dataset(s); 1 skipped")
    assert "MRI         90" in out and "colour      48" in out
    assert "phantom-rings       colour      manifest       2D   rings        48" in out
    assert "lost                PET         manifest       3D   PET          0" in out
    assert f"  {tmp_path / 'lost.nii'}: no such file or folder" in out

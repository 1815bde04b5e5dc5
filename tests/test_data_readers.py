"""Tests for the image readers (scripts/data/readers.py) and intensity normalisation (scripts/data/intensity.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from scripts.data.intensity import (
    dtype_range_intensity,
    normalise_intensity,
    percentile_intensity,
    to_channel_first,
    window_intensity,
)
from scripts.data.readers import ImageReadError, ImageSource, detect_format, read_header, read_image

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


GREY = np.arange(48, dtype=np.uint8).reshape(6, 8)
RGBA = np.arange(192, dtype=np.uint8).reshape(6, 8, 4)


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom's test file {name} is not installed"
    return Path(path)


def save_nifti(path: Path, volume: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return path


# --- real files shipped with pydicom and nibabel ----------------------------------------------------------

def test_ct_small_is_read_in_hounsfield_units() -> None:
    path = pydicom_file("CT_small.dcm")
    array, header = read_image(path)
    assert array.shape == (128, 128) and array.dtype == np.float32
    assert (header.format, header.shape, header.channels) == ("dicom", (128, 128), 1)
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(array, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    assert -1100 < array.min() < -800 and 1000 < array.max() < 3000  # air to bone, in HU
    assert -200 < np.median(array) < 200  # mostly soft tissue
    assert read_header(path) == header.__class__(path, "dicom", (128, 128), 1)


def test_mr_small_and_anatomical_nifti() -> None:
    mr, header = read_image(pydicom_file("MR_small.dcm"))
    assert mr.shape == (64, 64) and header.dtype == "int16" and mr.min() >= 0
    path = NIBABEL_DATA / "anatomical.nii"
    assert read_header(path).shape == (33, 41, 25)
    volume, header = read_image(path)
    assert volume.shape == (33, 41, 25) and header.format == "nifti"
    np.testing.assert_array_equal(volume, nib.load(path).get_fdata())


def test_dicom_series_is_stacked_in_spatial_order(tmp_path: Path) -> None:
    source = pydicom_file("DICOMDIR").parent / "98892001" / "CT5N"
    folder = shutil.copytree(source, tmp_path / "series")
    volume, header = read_image(folder)
    assert volume.shape == header.shape == (16, 16, 5) and header.format == "dicom-series"
    files = sorted(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    for k, file in enumerate(files):
        np.testing.assert_array_equal(volume[:, :, k], read_image(file)[0])
    assert read_header(ImageSource(folder, "dicom-series", tuple(reversed(files)))).shape == (16, 16, 5)


@pytest.mark.parametrize(
    ("mode", "pixels", "expected", "dtype"),
    [
        ("L", GREY, GREY, "uint8"),
        ("I;16", GREY.astype(np.uint16) * 250, GREY * 250.0, "uint16"),
        ("RGB", RGBA[..., :3], RGBA[..., :3], "uint8"),
        ("RGBA", RGBA, RGBA[..., :3], "uint8"),  # alpha dropped
        ("LA", RGBA[..., :2], RGBA[..., 0], "uint8"),  # grey + alpha: grey
    ],
)
def test_png_modes(tmp_path: Path, mode: str, pixels: np.ndarray, expected: np.ndarray, dtype: str) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode.startswith(mode[0])
    array, header = read_image(path)
    assert array.dtype == np.float32 and header.dtype == dtype
    np.testing.assert_array_equal(array, expected)
    assert read_header(path).channels == header.channels == (3 if expected.ndim == 3 else 1)


def test_palette_png_and_jpeg_become_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[:8] = (200, 30, 10)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "palette.png")
    Image.fromarray(rgb).save(tmp_path / "photo.JPG", quality=95)
    palette, _ = read_image(tmp_path / "palette.png")
    np.testing.assert_array_equal(palette, rgb)
    photo, header = read_image(tmp_path / "photo.JPG")
    assert header.format == "jpeg" and photo.shape == (16, 16, 3) and np.abs(photo - rgb).mean() < 5  # lossy


def test_4d_with_a_singleton_dimension_is_squeezed(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "single.nii.gz", np.arange(64 * 3, dtype=np.float32).reshape(8, 8, 1, 3, 1))
    volume, header = read_image(path)
    assert header.shape == volume.shape == (8, 8, 3)


def test_detect_format(tmp_path: Path) -> None:
    extensionless = tmp_path / "IM0001"
    shutil.copyfile(pydicom_file("CT_small.dcm"), extensionless)
    (tmp_path / "notes").write_text("hello")
    names = {"a.PNG": "png", "b.jpeg": "jpeg", "c.nii.gz": "nifti", "d.nii": "nifti", "e.dcm": "dicom"}
    for name, fmt in names.items():
        assert detect_format(tmp_path / name) == fmt
    assert detect_format(extensionless) == "dicom"
    assert detect_format(tmp_path / "notes") is None


# --- errors: ImageReadError naming the file and the problem, never a raw library exception ------------------

def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated_copy(source: Path, target: Path, keep: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def _truncated_nifti_gz(tmp_path: Path) -> Path:
    source = save_nifti(tmp_path / "full.nii.gz", np.random.default_rng(0).normal(size=(32, 32, 16)).astype(np.float32))
    return _truncated_copy(source, tmp_path / "cut.nii.gz", 0.6)


def _dicom_without_pixels(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "no_pixels.dcm")
    return tmp_path / "no_pixels.dcm"


def _truncated_png(tmp_path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "a.png")
    return _truncated_copy(tmp_path / "a.png", tmp_path / "cut.png", 0.5)


ERROR_CASES: dict[str, tuple[Callable[[Path], Path], str, bool]] = {
    # name: (make the bad file, expected fragment of the reason, found by the header read)
    "missing": (lambda d: d / "absent.nii.gz", "no such file", True),
    "unknown format": (lambda d: _written(d / "notes.txt", b"x"), "unrecognised image format", True),
    "garbage nifti": (lambda d: _written(d / "bad.nii", b"not a nifti"), "not a readable NIfTI file", True),
    "truncated nii": (lambda d: _truncated_copy(NIBABEL_DATA / "anatomical.nii", d / "cut.nii", 0.5),
                      "truncated NIfTI file", True),
    "truncated nii.gz": (_truncated_nifti_gz, "truncated", True),
    "dicom without pixel data": (_dicom_without_pixels, "no pixel data", True),
    "truncated dicom": (lambda d: shutil.copyfile(pydicom_file("MR_truncated.dcm"), d / "mr.dcm"), "truncated DICOM",
                        True),
    "4D": (lambda d: shutil.copyfile(NIBABEL_DATA / "example4d.nii.gz", d / "4d.nii.gz"), "4D image", True),
    "empty volume": (lambda d: save_nifti(d / "empty.nii.gz", np.zeros((0, 4, 4), np.float32)), "empty image", True),
    "NaN": (lambda d: save_nifti(d / "nan.nii.gz", np.where(np.eye(8)[..., None] > 0, np.nan, 1.0)
                                 .repeat(3, 2).astype(np.float32)), "NaN or Inf", False),
    "Inf": (lambda d: save_nifti(d / "inf.nii", np.full((4, 4, 2), np.inf, np.float32)), "NaN or Inf", False),
    "truncated png": (_truncated_png, "corrupt or truncated PNG", False),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_name_file_and_problem(tmp_path: Path, case: str) -> None:
    make, fragment, at_header = ERROR_CASES[case]
    path = make(tmp_path)
    if not at_header:
        read_header(path)  # the header is fine: only reading the data finds the problem
    for read in (read_header, read_image) if at_header else (read_image,):
        with pytest.raises(ImageReadError) as caught:
            read(path)
        assert isinstance(caught.value, ValueError)
        assert caught.value.path == path and str(path) in str(caught.value)
        assert fragment in caught.value.reason


def test_dicom_series_errors(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    root = pydicom_file("DICOMDIR").parent / "98892001"
    shutil.copyfile(root / "CT5N" / "2062", folder / "a.dcm")
    shutil.copyfile(root / "CT2N" / "6293", folder / "b.dcm")
    with pytest.raises(ImageReadError, match="a series folder must hold one series") as caught:
        read_header(folder)
    assert caught.value.path == folder / "b.dcm"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="folder holds no DICOM files"):
        read_header(tmp_path / "empty")


# --- intensity normalisation ------------------------------------------------------------------------------

def test_ct_windowing() -> None:
    hu = np.array([-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0])
    np.testing.assert_allclose(normalise_intensity(hu, "CT"), [0, 0, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(window_intensity(hu, (-160, 240)), [0, 0, 0.4, 1, 1, 1])
    np.testing.assert_allclose(normalise_intensity(hu, "CT", window=(0, 1000)), [0, 0, 0, 0.5, 1, 1])


def test_percentile_normalisation() -> None:
    values = np.arange(1001, dtype=np.float64)  # percentiles 0.5 and 99.5 are 5 and 995
    out = normalise_intensity(values, "MRI")
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    np.testing.assert_allclose(out[[0, 5, 500, 995, 1000]], [0, 0, 0.5, 1, 1], atol=1e-6)
    np.testing.assert_array_equal(percentile_intensity(values), out)
    spike = np.zeros(10_000)
    spike[:3] = 7.0  # percentiles coincide: plain min-max keeps the spike
    np.testing.assert_allclose(normalise_intensity(spike, "PET")[:4], [1, 1, 1, 0])


def test_dtype_range_and_constant_images() -> None:
    pixels = np.array([0.0, 51.0, 255.0])
    np.testing.assert_allclose(normalise_intensity(pixels, "X-ray", dtype="uint8"), [0, 0.2, 1])
    np.testing.assert_allclose(normalise_intensity(pixels, "colour", dtype="uint16"), pixels / 65535, rtol=1e-6)
    np.testing.assert_allclose(normalise_intensity(pixels, "fundus", dtype="float32"), [0, 0.2, 1])
    np.testing.assert_allclose(dtype_range_intensity(np.array([-128.0, 127.0]), "int8"), [0, 1])
    for modality in ("MRI", "colour", "other", "ultrasound"):
        out = normalise_intensity(np.full((4, 5), 42.0), modality)
        assert out.shape == (4, 5) and out.dtype == np.float32 and (out == 0).all()
    np.testing.assert_allclose(normalise_intensity(np.full((2, 2), 42.0), "CT"), 0.521)


def test_to_channel_first() -> None:
    assert to_channel_first(np.zeros((4, 5))).shape == (1, 4, 5)
    assert to_channel_first(np.zeros((4, 5, 1))).shape == (1, 4, 5)
    rgba = np.random.default_rng(0).random((4, 5, 4))
    np.testing.assert_array_equal(to_channel_first(rgba), np.moveaxis(rgba[..., :3], 2, 0))
    with pytest.raises(ValueError, match=r"got shape \(4, 5, 2\)"):
        to_channel_first(np.zeros((4, 5, 2)))

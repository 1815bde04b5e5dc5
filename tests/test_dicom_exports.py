"""DICOM as hospitals export it (issue 22, item 6): every compressed transfer syntax of PACS exports decodes with
the decoders requirements.txt installs, ultrasound cine loops are frames for pretraining and 2D+t volumes for
inference, and palette colour is scaled the same whatever the file's byte order and LUT bit depth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from monai.bundle import ConfigParser
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from dicom_exports import (
    dicom_dataset,
    jpeg_baseline_cine,
    jpeg_lossless_file,
    palette_file,
    save,
    smooth_image,
)
from scripts.data.readers import ImageReadError, read_header, read_image
from scripts.data.slices import PretrainSliceDataset
from scripts.make_manifest import make_manifest
from scripts.segmentation.datalist import SegmentationDataError, check_items

REPO_ROOT = Path(__file__).resolve().parents[1]
GREY = smooth_image((48, 40), 4095)  # 12-bit CT/MR-like
CINE = np.stack([smooth_image((5, 32, 24), 255, seed=seed) for seed in range(3)], axis=-1)  # (frames, H, W, RGB)


def _compressed(syntax: str, **options: object) -> Callable[[Dataset, Path], Path]:
    """Compress with pydicom's own encoders (pyjpegls for JPEG-LS, pylibjpeg-openjpeg for JPEG 2000)."""
    def make(ds: Dataset, path: Path) -> Path:
        ds.compress(syntax, **options)
        return save(ds, path)
    return make


# syntax -> (how the file is made, colour cine or grey, largest error allowed as a share of the value range)
SYNTAXES: dict[str, tuple[Callable[[Dataset, Path], Path], bool, float]] = {
    JPEGLosslessSV1: (lambda ds, path: jpeg_lossless_file(ds, path, JPEGLosslessSV1), False, 0.0),
    JPEGLossless: (lambda ds, path: jpeg_lossless_file(ds, path, JPEGLossless, predictor=7), True, 0.0),
    JPEGLSLossless: (_compressed(JPEGLSLossless), False, 0.0),
    JPEGLSNearLossless: (_compressed(JPEGLSNearLossless, jls_error=2), True, 2 / 255),
    JPEG2000Lossless: (_compressed(JPEG2000Lossless), False, 0.0),
    JPEG2000: (_compressed(JPEG2000, j2k_cr=[5]), False, 0.05),
}


@pytest.mark.parametrize("syntax", list(SYNTAXES), ids=lambda uid: f"{uid.name} ({uid})")
def test_compressed_syntaxes_decode_with_the_required_plugins(tmp_path: Path, syntax: str) -> None:
    make, colour, tolerance = SYNTAXES[syntax]
    reference = CINE if colour else GREY
    path = make(dicom_dataset(reference, colour=colour, bits_stored=None if colour else 12), tmp_path / "x.dcm")
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    # the pylibjpeg plugins of requirements.txt decode it on their own (pydicom may prefer another plugin)
    assert "pylibjpeg" in get_decoder(syntax).available_plugins
    by_pylibjpeg = pixel_array(path, decoding_plugin="pylibjpeg").astype(np.float64)

    header = read_header(path)
    array, header = read_image(path)
    expected = np.moveaxis(reference, 0, 2) if colour else reference  # frames after rows and columns
    assert header.shape == expected.shape[:3 if colour else 2] and header.channels == (3 if colour else 1)
    value_range = 255 if colour else 4095
    for decoded in (array, np.moveaxis(by_pylibjpeg, 0, 2) if colour else by_pylibjpeg):
        error = np.abs(decoded - expected)
        if tolerance == 0.0:
            assert np.array_equal(decoded, expected)
        elif syntax == JPEGLSNearLossless:  # near-lossless bounds every pixel's error
            assert 0 < error.max() <= tolerance * value_range
        else:
            assert 0 < error.mean() <= tolerance * value_range


def test_missing_decoder_is_named_with_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = jpeg_lossless_file(dicom_dataset(GREY, bits_stored=12), tmp_path / "sv1.dcm")
    decoder = get_decoder(JPEGLosslessSV1)
    monkeypatch.setattr(decoder, "_available", {})  # as without pylibjpeg-libjpeg installed
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")})
    for read in (read_header, read_image):
        with pytest.raises(ImageReadError, match="no installed decoder for the transfer syntax JPEG Lossless") as caught:
            read(path)
        assert caught.value.path == path and "pylibjpeg-libjpeg" in caught.value.reason


def _cine_exam(root: Path) -> tuple[Path, Path]:
    """Two cine loops of one ultrasound series (as machines export them), JPEG baseline YBR_FULL_422 and JPEG
    Lossless RGB, in a folder named ``us``."""
    series = pydicom.uid.generate_uid()
    first = jpeg_baseline_cine(CINE, root / "us" / "loop1.dcm")
    ds = pydicom.dcmread(first)
    ds.SeriesInstanceUID = series
    ds.save_as(first)
    second = jpeg_lossless_file(dicom_dataset(CINE[:3], colour=True, modality="US", series_uid=series),
                                root / "us" / "loop2.dcm", JPEGLossless, predictor=1)
    return first, second


def test_cine_loops_give_one_rgb_pretraining_sample_per_frame(tmp_path: Path) -> None:
    first, second = _cine_exam(tmp_path / "exam")
    entries, unreadable = make_manifest(tmp_path / "exam", tmp_path / "manifest.json")
    assert not unreadable and len(entries) == 1
    entry = entries[0].entry
    assert (entry.modality, entry.dimension, entry.format) == ("ultrasound", 3, "dicom-series")
    dataset = PretrainSliceDataset(tmp_path / "manifest.json", on_error="raise", header_cache=False)
    assert len(dataset) == 5 + 3 and not dataset.skipped
    samples = [dataset[i] for i in range(len(dataset))]
    by_source = {Path(s["source"]).name: [] for s in samples}
    for sample in samples:
        assert sample["image"].shape == (3, 32, 24) and sample["modality"] == "ultrasound"
        by_source[Path(sample["source"]).name].append(sample)
    assert sorted(by_source) == ["loop1.dcm", "loop2.dcm"]
    for name, frames, tolerance in (("loop1.dcm", CINE, 8 / 255), ("loop2.dcm", CINE[:3], 0.0)):
        assert [s["slice"] for s in by_source[name]] == list(range(len(frames)))
        for sample, frame in zip(by_source[name], frames):
            expected = np.moveaxis(frame, 2, 0) / 255.0  # 8-bit ultrasound: scaled by its type's range
            assert np.abs(sample["image"].numpy() - expected).mean() <= tolerance + 1e-6


def test_colour_volume_is_cut_only_into_frames(tmp_path: Path) -> None:
    first, _ = _cine_exam(tmp_path / "exam")
    from scripts.data.manifest import SourceDataset

    entry = SourceDataset("cine", first, "ultrasound", 3, slice_axis=0, format="dicom-series")
    with pytest.raises(ImageReadError, match="colour volumes are cut into their frames only"):
        PretrainSliceDataset([entry], on_error="raise", header_cache=False)


def test_cine_loop_is_a_2d_plus_t_volume_for_segmentation_inference(tmp_path: Path) -> None:
    first, second = _cine_exam(tmp_path / "exam")
    items = [{"image": str(first)}, {"image": str(second)}]
    assert check_items(items, in_channels=3, with_label=False) == items
    with pytest.raises(SegmentationDataError, match="image has 3 channels but the network takes in_channels=1"):
        check_items(items, in_channels=1, with_label=False)
    parser = ConfigParser()
    parser.read_config(REPO_ROOT / "configs" / "inference.json")
    parser.update({"bundle_root": str(REPO_ROOT), "in_channels": 3, "image_size": 16})
    preprocessing = parser.get_parsed_content("preprocessing")
    for item, frames in zip(items, (5, 3)):
        image = preprocessing(dict(item))["image"]
        # channels first, the frames along the slice axis that the 2D network is run across
        assert tuple(image.shape) == (3, 16, 16, frames)


def test_palette_colour_is_the_same_whatever_byte_order_and_lut_bits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lut = rng.integers(0, 256, (256, 3))
    indices = rng.integers(0, 256, (10, 12))
    for bits in (8, 16):
        for big_endian in (False, True):
            path = palette_file(indices, lut * (257 if bits == 16 else 1), tmp_path / f"{bits}-{big_endian}.dcm",
                                lut_bits=bits, big_endian=big_endian)
            array, header = read_image(path)
            assert header.channels == 3 and header.dtype == "uint8", (bits, big_endian)
            np.testing.assert_array_equal(array, lut[indices], err_msg=f"{bits}-bit LUT, big endian {big_endian}")


def test_palette_lut_values_beyond_its_bits_are_an_error(tmp_path: Path) -> None:
    lut = np.full((4, 3), 300)  # does not fit the 8 bits the descriptor gives
    path = palette_file(np.zeros((4, 4), int), lut, tmp_path / "bad.dcm", lut_bits=8, big_endian=False)
    with pytest.raises(ImageReadError, match="holds values up to 300 but its descriptor gives 8 bits"):
        read_image(path)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"])
def test_compressed_files_pydicom_ships_equal_their_uncompressed_original(name: str) -> None:
    from pydicom.data import get_testdata_file

    original, _ = read_image(get_testdata_file("MR_small.dcm", download=False))
    decoded, _ = read_image(get_testdata_file(name, download=False))
    np.testing.assert_array_equal(decoded, original)

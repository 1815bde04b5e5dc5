"""DICOM files as PACS and ultrasound machines export them, made in tests: compressed transfer syntaxes, cine
loops, palette colour. Shared by the reader, manifest and inference tests."""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    SecondaryCaptureImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

__all__ = ["dicom_dataset", "jpeg_baseline_cine", "jpeg_lossless", "jpeg_lossless_file", "palette_file", "save", "smooth_image"]


def dicom_dataset(pixels: np.ndarray, *, bits_stored: int | None = None, colour: bool = False,
                  modality: str = "OT", series_uid: str | None = None) -> Dataset:
    """An uncompressed (Explicit VR Little Endian) dataset holding ``pixels``: (H, W) or (frames, H, W) grey, or
    (H, W, 3) / (frames, H, W, 3) RGB when ``colour``; unsigned 8- or 16-bit values."""
    frames = pixels.shape[0] if pixels.ndim == (4 if colour else 3) else 1
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = UltrasoundMultiFrameImageStorage if frames > 1 else SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series_uid or generate_uid()
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=f"<u{pixels.dtype.itemsize}").tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_lossless(frame: np.ndarray, precision: int, predictor: int = 1) -> bytes:
    """One frame, (H, W) or (H, W, C), as an ITU-T T.81 lossless (process 14, Huffman) JPEG stream with one
    interleaved scan and one Huffman table in which each difference category 0-16 has a 5-bit code.

    Written by hand for the tests: no Python package encodes this syntax except GDCM, which, once installed,
    pydicom would also use first for decoding, hiding whether the required pylibjpeg plugins decode it.
    """
    rows, columns = frame.shape[:2]
    samples = frame.reshape(rows, columns, -1).astype(np.int64)
    components = samples.shape[2]
    stream = bytearray(b"\xff\xd8")

    def segment(marker: int, payload: bytes) -> None:
        stream.extend(struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload)

    segment(0xC3, struct.pack(">BHHB", precision, rows, columns, components)
            + b"".join(bytes([c + 1, 0x11, 0]) for c in range(components)))
    segment(0xC4, bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17)))
    segment(0xDA, bytes([components]) + b"".join(bytes([c + 1, 0x00]) for c in range(components))
            + bytes([predictor, 0, 0]))
    bits: list[str] = []
    for row in range(rows):
        for column in range(columns):
            for c in range(components):
                value = samples[row, column, c]
                if row == 0 and column == 0:
                    prediction = 1 << (precision - 1)
                elif row == 0:
                    prediction = samples[row, column - 1, c]
                elif column == 0:
                    prediction = samples[row - 1, column, c]
                else:
                    a, b, d = samples[row, column - 1, c], samples[row - 1, column, c], samples[row - 1, column - 1, c]
                    prediction = {1: a, 2: b, 3: d, 4: a + b - d, 5: a + ((b - d) >> 1), 6: b + ((a - d) >> 1),
                                  7: (a + b) >> 1}[predictor]
                difference = int(value - prediction) % 65536
                difference = difference - 65536 if difference >= 32768 else difference
                category = 16 if difference == -32768 else abs(difference).bit_length()
                bits.append(format(category, "05b"))
                if 0 < category < 16:
                    extra = difference if difference > 0 else difference - 1
                    bits.append(format(extra & ((1 << category) - 1), f"0{category}b"))
    code = "".join(bits)
    code += "1" * (-len(code) % 8)
    for start in range(0, len(code), 8):
        byte = int(code[start:start + 8], 2)
        stream.append(byte)
        if byte == 0xFF:
            stream.append(0x00)
    stream += b"\xff\xd9"
    return bytes(stream)


def jpeg_lossless_file(ds: Dataset, path: Path, syntax: str = JPEGLosslessSV1, predictor: int = 1) -> Path:
    """``ds`` (uncompressed) saved with its frames encoded by :func:`jpeg_lossless` (SV1: predictor 1)."""
    if syntax == JPEGLosslessSV1 and predictor != 1:
        raise ValueError(f"JPEG Lossless SV1 uses predictor 1, got {predictor}")
    array = ds.pixel_array
    frames = array if int(ds.get("NumberOfFrames") or 1) > 1 else array[None]
    ds = ds.copy()
    ds.PixelData = encapsulate([jpeg_lossless(frame, int(ds.BitsStored), predictor) for frame in frames])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    return save(ds, path)


def jpeg_baseline_cine(frames: np.ndarray, path: Path, modality: str = "US") -> Path:
    """An RGB cine loop (frames, H, W, 3) as ultrasound machines export it: JPEG baseline frames (Pillow,
    quality 95, 4:2:2 chroma subsampling), Photometric Interpretation YBR_FULL_422."""
    ds = dicom_dataset(frames, colour=True, modality=modality)
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=95, subsampling=1)
        encoded.append(buffer.getvalue())
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return save(ds, path)


def palette_file(indices: np.ndarray, lut: np.ndarray, path: Path, *, lut_bits: int, big_endian: bool) -> Path:
    """A PALETTE COLOR image: 16-bit ``indices`` (H, W) into ``lut`` (entries, 3), whose entries are written with
    ``lut_bits`` (8 or 16) bits in 16-bit words, in the byte order of Explicit VR Big or Little Endian."""
    order = ">" if big_endian else "<"
    ds = dicom_dataset(indices.astype(np.uint16))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.PixelData = indices.astype(f"{order}u2").tobytes()
    for channel, colour in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [len(lut), 0, lut_bits])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut[:, channel].astype(f"{order}u2").tobytes())
        ds[f"{colour}PaletteColorLookupTableData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian if big_endian else ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True, little_endian=not big_endian, implicit_vr=False)
    return path


def smooth_image(shape: Sequence[int], maximum: int, seed: int = 0) -> np.ndarray:
    """Unsigned integers in [0, maximum] forming smooth blobs plus noise (compresses like a medical image)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    field = sum(np.sin((2 + 3 * rng.random()) * np.pi * grid + rng.random()) for grid in grids)
    field = (field - field.min()) / (np.ptp(field) or 1.0)
    noisy = field * 0.9 * maximum + rng.integers(0, max(2, maximum // 20), size=tuple(shape))
    return np.clip(noisy, 0, maximum).astype(np.uint16 if maximum > 255 else np.uint8)

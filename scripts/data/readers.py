"""Read one image (PNG/JPEG, NIfTI, DICOM file or DICOM series) into a float32 array, or only its header.

Libraries: MONAI's ``PILReader`` for PNG/JPEG, nibabel for NIfTI, pydicom for DICOM. Array layout:

- 2D: (H, W) grey, or (H, W, 3) colour (palette, RGBA, CMYK ... are converted to RGB, alpha is dropped);
- 3D: the stored axis order; NIfTI as nibabel gives it (not reoriented), a multi-frame DICOM file as
  (rows, columns, frames), a DICOM series as (rows, columns, slices) with slices in spatial order; colour
  DICOM (a multi-frame ultrasound cine, 2D+t) as (rows, columns, frames, 3), YBR converted to RGB.

Palette colour (PNG or DICOM PALETTE COLOR) becomes 8-bit RGB: a DICOM palette's entries are scaled from the
bits its LUT descriptor gives (8 or 16) to 0-255, so the same picture gives the same values whatever the LUT's
bit depth and the file's byte order.

Values are in stored units after rescaling (NIfTI ``scl_slope``/``scl_inter``, DICOM Rescale Slope/Intercept
or Modality LUT, so CT is in HU); DICOM MONOCHROME1 is inverted so that bright means dense.

Compressed DICOM (JPEG baseline and lossless, JPEG-LS, JPEG 2000, RLE) is decoded by pydicom's pixel-data
plugins (pylibjpeg with its libjpeg, openjpeg and rle plugins, pyjpegls, Pillow; see requirements.txt).

Every problem (missing file, unknown format, corrupt or truncated file, DICOM without pixel data or without
a decoder, 4D, empty, NaN/Inf) raises :class:`ImageReadError` naming the file and the problem. Header reads
check as much as they can without decoding pixels: that the data is present and complete (NIfTI file size,
DICOM pixel data length) and decodable (DICOM transfer syntax); corrupt compressed data and NaN/Inf values are
only found when the data is read.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from monai.data import PILReader
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.misc import is_dicom

from scripts.data.manifest import FORMATS

__all__ = [
    "ImageHeader",
    "ImageReadError",
    "ImageSource",
    "detect_format",
    "group_dicom_series",
    "read_header",
    "read_image",
]

_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".nii": "nifti", ".nii.gz": "nifti",
             ".dcm": "dicom", ".dicom": "dicom", ".ima": "dicom"}
_PIL_GREY_MODES = ("1", "L", "LA", "La", "I", "F")  # and every "I;16..." mode
_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_DEFER_BYTES = 1024  # header reads skip values longer than this (pixel data, large private blobs)
_UNDEFINED_LENGTH = 0xFFFFFFFF


class ImageReadError(ValueError):
    """An image could not be read; ``path`` is the file (or series folder), ``reason`` the problem."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class ImageSource:
    """One image to read: a file, or the files of one DICOM series (``path`` is then their folder)."""

    path: Path
    format: str
    files: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"{self.path}: format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if (self.format == "dicom-series") != bool(self.files):
            raise ValueError(f"{self.path}: a dicom-series source needs its files, other formats none")


@dataclass(frozen=True)
class ImageHeader:
    """What is known about an image: spatial ``shape`` (2 or 3 dims) and ``channels`` (1 grey, 3 RGB, last axis).

    ``dtype`` is the data type of the values after rescaling (e.g. ``"uint8"`` for an 8-bit PNG, ``"float64"``
    for CT after Rescale Slope/Intercept); :func:`read_header` leaves it None, :func:`read_image` sets it.
    """

    path: Path
    format: str
    shape: tuple[int, ...]
    channels: int
    dtype: str | None = None


def detect_format(path: Path | str) -> str | None:
    """The format of an image file by its name (.png, .jpg/.jpeg, .nii/.nii.gz, .dcm/.dicom/.ima) or, failing
    that, by the DICOM preamble; None when it is none of these."""
    path = Path(path)
    name = path.name.lower()
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    try:
        return "dicom" if path.is_file() and is_dicom(path) else None
    except OSError:
        return None


def _as_source(source: ImageSource | Path | str, format: str | None) -> ImageSource:
    if isinstance(source, ImageSource):
        return source
    path = Path(source)
    if not path.exists():
        raise ImageReadError(path, "no such file or folder")
    if path.is_dir():
        files = tuple(sorted(f for f in path.iterdir() if f.is_file() and detect_format(f) == "dicom"))
        if not files:
            raise ImageReadError(path, "folder holds no DICOM files (a folder is read as one DICOM series)")
        return ImageSource(path, "dicom-series", files)
    fmt = format or detect_format(path)
    if fmt is None:
        raise ImageReadError(path, "unrecognised image format (expected .png, .jpg, .nii, .nii.gz or DICOM)")
    if fmt not in FORMATS or fmt == "dicom-series":
        raise ImageReadError(path, f"format {fmt!r} does not name a file format")
    return ImageSource(path, fmt)


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn any library exception raised inside into an ImageReadError naming ``path`` and ``what`` failed."""
    try:
        yield
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, "no such file or folder") from None
    except Exception as error:  # noqa: BLE001 - libraries raise anything from OSError to struct.error on bad files
        raise ImageReadError(path, f"{what} ({type(error).__name__}: {error})") from error


def _check_shape(path: Path, shape: Sequence[int], channels: int) -> tuple[int, ...]:
    """Spatial shape after dropping singleton dimensions beyond the third; rejects empty, 1D and 4D images."""
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) == 0:
        raise ImageReadError(path, f"empty image (shape {shape})")
    squeezed = list(shape)
    for axis in range(len(shape) - 1, -1, -1):
        if len(squeezed) <= 3:
            break
        if squeezed[axis] == 1:
            del squeezed[axis]
    if len(squeezed) > 3:
        raise ImageReadError(path, f"{len(squeezed)}D image of shape {shape}: only 2D and 3D images are supported "
                                   "(a singleton extra dimension is dropped)")
    if len(squeezed) < 2:
        raise ImageReadError(path, f"1D image of shape {shape}: only 2D and 3D images are supported")
    return tuple(squeezed)


# --- PNG / JPEG -------------------------------------------------------------------------------------------

def _pil_channels(mode: str) -> int:
    return 1 if mode in _PIL_GREY_MODES or mode.startswith("I;16") else 3


def _pil_grey_or_rgb(image: Image.Image) -> Image.Image:
    """Bilevel and grey+alpha become 8-bit grey, other grey modes stay, everything else becomes RGB."""
    if image.mode in ("1", "LA", "La"):
        return image.convert("L")
    return image if _pil_channels(image.mode) == 1 else image.convert("RGB")


def _pil_header(path: Path, fmt: str) -> ImageHeader:
    with _reading(path, f"not a readable {fmt.upper()} file"), PILReader(reverse_indexing=False).read(path) as image:
        width, height = image.size
        channels = _pil_channels(image.mode)
    return ImageHeader(path, fmt, _check_shape(path, (height, width), channels), channels)


def _pil_data(path: Path, fmt: str) -> np.ndarray:
    reader = PILReader(converter=_pil_grey_or_rgb, reverse_indexing=False)
    with _reading(path, f"corrupt or truncated {fmt.upper()} file"):
        image = reader.read(path)
        try:
            array, _ = reader.get_data(image)
        finally:
            image.close()
    return array


# --- NIfTI ------------------------------------------------------------------------------------------------

def _gzip_content_size(path: Path) -> int:
    """Uncompressed size of a gzip file, by decompressing it (EOFError when it is truncated)."""
    total = 0
    with gzip.open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            total += len(chunk)
    return total


def _nifti_image(path: Path) -> nib.Nifti1Image:
    with _reading(path, "not a readable NIfTI file"):
        image = nib.load(path)
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
        raise ImageReadError(path, f"not a NIfTI image (nibabel read it as {type(image).__name__})")
    return image


def _check_nifti_size(path: Path, image: nib.Nifti1Image) -> None:
    """The file holds all the voxels its header announces (a truncated file is found without reading them)."""
    needed = int(image.dataobj.offset) + math.prod(image.shape) * image.get_data_dtype().itemsize
    if path.name.lower().endswith(".gz"):
        with _reading(path, "truncated or corrupt gzip stream"):
            with path.open("rb") as raw:  # the gzip trailer ends with the content size modulo 2**32 (RFC 1952)
                raw.seek(-4, 2)
                (recorded,) = struct.unpack("<I", raw.read(4))
            # a match is proof enough (a truncated file ends in arbitrary bytes), otherwise count by decompressing
            held = needed if recorded == needed % 2**32 else _gzip_content_size(path)
    else:
        held = path.stat().st_size
    if held < needed:
        raise ImageReadError(path, f"truncated NIfTI file: the header announces {needed} bytes of header and "
                                   f"voxels but the file holds {held}")


def _nifti_header(path: Path, channels_last: bool = False) -> ImageHeader:
    image = _nifti_image(path)
    if channels_last and len(image.shape) == 4 and image.shape[3] > 1:  # e.g. the MSD's BraTS volumes, (x, y, z, 4)
        shape, channels = _check_shape(path, image.shape[:3], 1), int(image.shape[3])
    else:
        shape, channels = _check_shape(path, image.shape, 1), 1
    _check_nifti_size(path, image)
    return ImageHeader(path, "nifti", shape, channels)


def _nifti_data(path: Path) -> np.ndarray:
    image = _nifti_image(path)
    with _reading(path, "corrupt or truncated NIfTI data"):
        return np.asanyarray(image.dataobj)  # scl_slope / scl_inter applied; integer dtype kept when unscaled


# --- DICOM ------------------------------------------------------------------------------------------------

def _dicom_dataset_header(path: Path) -> Dataset:
    """The elements of a DICOM file with long values deferred, after checking that it holds pixel data which is
    decodable and complete, so that unreadable files are found without decoding them."""
    with _reading(path, "not a readable DICOM file"):
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        element = next((ds.get_item(tag, keep_deferred=True) for tag in _PIXEL_DATA_TAGS if tag in ds), None)
        if element is None:
            raise ImageReadError(path, "DICOM file has no pixel data (no PixelData element)")
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 0)
        if min(rows, columns, frames, samples) < 1 or bits not in (1, 8, 16, 32, 64):
            raise ImageReadError(path, f"DICOM file has invalid image attributes (Rows={rows}, Columns={columns}, "
                                       f"NumberOfFrames={frames}, SamplesPerPixel={samples}, BitsAllocated={bits})")
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is None:
            raise ImageReadError(path, "DICOM file has no TransferSyntaxUID, so its pixel data cannot be decoded")
        if syntax.is_compressed:
            from pydicom.pixels import get_decoder  # see _dicom_data on this late import

            try:
                decoder = get_decoder(syntax)
            except NotImplementedError:
                raise ImageReadError(path, f"pydicom has no decoder for the transfer syntax {syntax.name} "
                                           f"({syntax})") from None
            if not decoder.is_available:
                raise ImageReadError(path, f"no installed decoder for the transfer syntax {syntax.name} "
                                           f"(needs one of: {'; '.join(decoder.missing_dependencies)})")
        elif isinstance(element, RawDataElement) and element.length != _UNDEFINED_LENGTH and not syntax.is_deflated:
            needed = math.ceil(rows * columns * frames * samples * bits / 8)
            if element.length < needed:
                raise ImageReadError(path, f"DICOM pixel data holds {element.length} bytes, {rows}x{columns}x"
                                           f"{frames} frames of {samples}x{bits} bits need {needed}")
            size = path.stat().st_size
            if element.value_tell + element.length > size:
                raise ImageReadError(path, f"truncated DICOM file: its pixel data ends at byte "
                                           f"{element.value_tell + element.length} but the file has {size} bytes")
    return ds


def _dicom_layout(ds: Dataset) -> tuple[tuple[int, ...], int]:
    """(shape, channels): (rows, columns) or (rows, columns, frames); palette colour counts as RGB."""
    channels = 3 if ds.get("PhotometricInterpretation") == "PALETTE COLOR" else int(ds.get("SamplesPerPixel") or 1)
    frames = int(ds.get("NumberOfFrames") or 1)
    shape = (int(ds.Rows), int(ds.Columns))
    return (*shape, frames) if frames > 1 else shape, channels


def _dicom_header(path: Path) -> ImageHeader:
    shape, channels = _dicom_layout(_dicom_dataset_header(path))
    return ImageHeader(path, "dicom", _check_shape(path, shape, channels), channels)


_PALETTE_CHANNELS = ("Red", "Green", "Blue")


def _palette_rgb(path: Path, indices: np.ndarray, ds: Dataset) -> np.ndarray:
    """8-bit RGB of a PALETTE COLOR image: pydicom's ``apply_color_lut``, with two corrections.

    pydicom 3.0 reads non-segmented 16-bit LUT data in the machine's byte order, so the 8-bit entries of a
    big-endian file come back as 0-65280 where the little-endian file gives 0-255; and it returns 8- or 16-bit
    values depending on the LUT. Here a big-endian file's LUT data is byte-swapped before the lookup, and the
    entries are scaled from the descriptor's bits (8 or 16) to 0-255.
    """
    from pydicom.pixels import apply_color_lut  # see _dicom_data on this late import

    descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
    if descriptor is None or len(descriptor) != 3 or int(descriptor[2]) not in (8, 16):
        raise ImageReadError(path, f"PALETTE COLOR image whose Red Palette Color Lookup Table Descriptor "
                                   f"{descriptor!r} does not give 8 or 16 bits per entry")
    bits, entries = int(descriptor[2]), int(descriptor[0]) or 2**16
    lut = ds
    if "RedPaletteColorLookupTableData" in ds and not ds.file_meta.TransferSyntaxUID.is_little_endian:
        lut = Dataset()
        for colour in _PALETTE_CHANNELS:
            setattr(lut, f"{colour}PaletteColorLookupTableDescriptor",
                    ds[f"{colour}PaletteColorLookupTableDescriptor"].value)
            data = ds[f"{colour}PaletteColorLookupTableData"].value
            if len(data) == 2 * entries:  # 16-bit words (8-bit entries may also be stored one per byte)
                data = np.frombuffer(data, dtype=">u2").astype("<u2").tobytes()
            setattr(lut, f"{colour}PaletteColorLookupTableData", data)
    rgb = apply_color_lut(indices, lut)[..., :3]
    top = 2**bits - 1
    if int(rgb.max()) > top:
        raise ImageReadError(path, f"PALETTE COLOR lookup table holds values up to {int(rgb.max())} but its "
                                   f"descriptor gives {bits} bits per entry")
    return rgb.astype(np.uint8) if bits == 8 else np.round(rgb * (255.0 / top)).astype(np.uint8)


def _dicom_data(path: Path) -> np.ndarray:
    """Pixels in modality units (HU for CT), frames before channels, MONOCHROME1 inverted, palette colour as
    8-bit RGB."""
    # pydicom.pixels is pydicom 3's API; imported here so that this module (and the bundle's configs) also import
    # where pydicom 2 is pinned (MONAI Label's environment needs pydicom<3), which only fails on reading DICOM
    from pydicom.pixels import apply_modality_lut

    with _reading(path, "cannot decode DICOM pixel data"):
        ds = pydicom.dcmread(path)
        array = ds.pixel_array  # YBR colour comes back as RGB
        photometric = ds.get("PhotometricInterpretation", "")
        if photometric == "PALETTE COLOR":
            array = _palette_rgb(path, array, ds)
        else:
            array = apply_modality_lut(array, ds)
        if photometric == "MONOCHROME1":
            array = (float(array.max()) + float(array.min())) - array.astype(np.float64)
        if int(ds.get("NumberOfFrames") or 1) > 1:
            array = np.moveaxis(array, 0, 2)
    return array


def group_dicom_series(files: Sequence[Path]) -> list[tuple[Path, ...]]:
    """DICOM files grouped by SeriesInstanceUID, groups in order of first appearance. A multi-frame file (an
    ultrasound series often holds several cine loops) and a file whose header cannot be read form a group of
    their own, so that each loop is one volume and reading an unreadable file reports the problem."""
    groups: dict[str, list[Path]] = {}
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "NumberOfFrames"])
            multi_frame = int(ds.get("NumberOfFrames") or 1) > 1
            uid = f"multi-frame:{file}" if multi_frame else str(ds.get("SeriesInstanceUID",
                                                                       f"no-series-uid:{file.parent}"))
        except Exception:  # noqa: BLE001 - reported with its reason when the group is read
            uid = f"unreadable:{file}"
        groups.setdefault(uid, []).append(file)
    return [tuple(group) for group in groups.values()]


def _slice_order(headers: Sequence[tuple[Path, Dataset]]) -> list[int]:
    """Order of slices along the slice normal (ImagePositionPatient and ImageOrientationPatient), else by
    InstanceNumber, else by file name."""
    def has(ds: Dataset, keyword: str, length: int) -> bool:
        value = ds.get(keyword)
        return value is not None and len(value) == length

    if all(has(ds, "ImagePositionPatient", 3) and has(ds, "ImageOrientationPatient", 6) for _, ds in headers):
        keys = []
        for _, ds in headers:
            orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
            normal = np.cross(orientation[:3], orientation[3:])
            keys.append(float(normal @ np.asarray(ds.ImagePositionPatient, dtype=np.float64)))
    elif all(ds.get("InstanceNumber") is not None for _, ds in headers):
        keys = [float(ds.InstanceNumber) for _, ds in headers]
    else:
        keys = [0.0] * len(headers)
    return sorted(range(len(headers)), key=lambda i: (keys[i], headers[i][0].name))


def _series_files(source: ImageSource) -> tuple[list[Path], ImageHeader]:
    """The series' files in slice order and its header (rows, columns, slices); every file is checked."""
    headers: list[tuple[Path, Dataset]] = []
    for file in source.files:
        ds = _dicom_dataset_header(file)
        shape, channels = _dicom_layout(ds)
        if len(shape) == 3 and len(source.files) > 1:
            raise ImageReadError(file, f"multi-frame file ({shape[2]} frames) inside a DICOM series")
        if headers:
            first, first_ds = headers[0]
            if (shape, channels, ds.get("SeriesInstanceUID")) != (
                *_dicom_layout(first_ds), first_ds.get("SeriesInstanceUID")
            ):
                raise ImageReadError(file, f"slice of shape {shape} x {channels} channel(s) of series "
                                           f"{ds.get('SeriesInstanceUID')} does not match the first slice "
                                           f"{first.name} of {source.path} (a series folder must hold one series)")
        headers.append((file, ds))
    files = [headers[i][0] for i in _slice_order(headers)]
    shape, channels = _dicom_layout(headers[0][1])
    shape = shape if len(shape) == 3 else (*shape, len(files))
    return files, ImageHeader(source.path, "dicom-series", _check_shape(source.path, shape, channels), channels)


def _series_data(files: Sequence[Path]) -> np.ndarray:
    slices = [_dicom_data(file) for file in files]
    return slices[0] if len(slices) == 1 and slices[0].ndim == 3 else np.stack(slices, axis=2)


# --- public API -------------------------------------------------------------------------------------------

def read_header(source: ImageSource | Path | str, format: str | None = None, *,
                channels_last: bool = False) -> ImageHeader:
    """Header of an image without decoding its pixels (``dtype`` is left None).

    Args:
        source: an :class:`ImageSource`, a file, or a folder holding one DICOM series.
        format: format of a file, by default detected from its name or DICOM preamble.
        channels_last: read a 4D NIfTI (x, y, z, c) as a volume of c channels, as MONAI's ``LoadImage`` does (the
            segmentation workflows, whose transforms keep channels); otherwise it is refused as 4D.

    Raises:
        ImageReadError: missing, unrecognised, unreadable, truncated, empty or 4D image; DICOM without pixel
            data or without an installed decoder; a folder holding more than one series.
    """
    source = _as_source(source, format)
    if source.format == "dicom-series":
        return _series_files(source)[1]
    if not source.path.is_file():
        raise ImageReadError(source.path, "no such file")
    if source.format == "nifti":
        return _nifti_header(source.path, channels_last)
    if source.format == "dicom":
        return _dicom_header(source.path)
    return _pil_header(source.path, source.format)


def read_image(source: ImageSource | Path | str, format: str | None = None) -> tuple[np.ndarray, ImageHeader]:
    """Read an image as a float32 array (layout in the module docstring) and its header, with ``dtype`` set.

    Raises:
        ImageReadError: everything :func:`read_header` reports, plus corrupt pixel data and NaN/Inf values.
    """
    source = _as_source(source, format)
    if source.format == "dicom-series":
        files, header = _series_files(source)
        array = _series_data(files)
    else:
        header = read_header(source)
        reader = {"nifti": _nifti_data, "dicom": _dicom_data}.get(source.format)
        array = reader(source.path) if reader is not None else _pil_data(source.path, source.format)
    expected = header.shape if header.channels == 1 else (*header.shape, header.channels)
    if [s for s in array.shape if s != 1] != [s for s in expected if s != 1]:
        raise ImageReadError(source.path, f"data of shape {array.shape} does not match the header's {expected}")
    dtype = array.dtype.name
    with _reading(source.path, f"values of type {dtype} are not numbers"):
        array = np.asarray(array, dtype=np.float32).reshape(expected)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ImageReadError(source.path, f"{bad} NaN or Inf value(s) in an image of shape {expected}")
    return array, replace(header, dtype=dtype)

"""Embedded default data: a small multi-modality collection built from installed packages, with no download.

:func:`prepare_embedded_data` writes under a root folder, skipping files that already exist:

- real files shipped with installed packages: pydicom's ``CT_small.dcm`` (CT, 128 x 128) and ``MR_small.dcm``
  (MRI, 64 x 64), the 5-slice CT series ``dicomdirtests/98892001/CT5N`` of pydicom's DICOMDIR tests
  (16 x 16 x 5), and nibabel's ``anatomical.nii`` (MRI, 33 x 41 x 25); labelled by modality ("CT", "MRI");
- synthetic phantoms drawn with fixed seeds, one visually distinct class per label: ``discs`` (grey PNG,
  X-ray), ``stripes`` (grey PNG, ultrasound), ``rings`` (RGB PNG, colour), 48 of 128 x 128 each, and
  ``ct-phantom`` (chest-like CT NIfTI in HU) and ``mri-phantom`` (head-like MRI NIfTI), 2 volumes of
  64 x 64 x 32 each;
- ``manifest.json`` listing them (written last, so an interrupted run leaves no manifest naming missing files).

That is 144 + 128 + 1 + 1 + 5 + 25 = 304 slice samples in about 4 MB; a kNN probe on the labels has three
2D and two 3D classes to tell apart. Real files whose package lacks them are left out of the manifest.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data.synthetic import create_test_image_2d
from PIL import Image
from pydicom.data import get_testdata_file
from scipy.ndimage import gaussian_filter

from scripts.atomic_save import write_atomically
from scripts.data.manifest import SourceDataset, save_manifest
from scripts.data.readers import ImageReadError, ImageSource, read_header

__all__ = ["prepare_embedded_data", "real_files", "save_png"]

logger = logging.getLogger("lvmmed.data")

IMAGES_PER_CLASS = 48
IMAGE_SIZE = 128
VOLUMES_PER_CLASS = 2
VOLUME_SHAPE = (64, 64, 32)
DICOM_SERIES = ("98892001", "CT5N")  # below pydicom's dicomdirtests folder


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` unless it exists, through a temporary file renamed into place."""
    if not path.exists():
        write_atomically(path, write)


def _copy(source: Path, target: Path) -> None:
    _write_atomically(target, lambda temporary: shutil.copyfile(source, temporary))


def save_png(image: np.ndarray, path: Path) -> None:
    """Save values in [0, 1], (H, W) grey or (H, W, 3) colour, as an 8-bit PNG."""
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    _write_atomically(path, lambda temporary: Image.fromarray(pixels).save(temporary, format="PNG"))


def _save_nifti(volume: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    image = nib.Nifti1Image(np.round(volume).astype(np.int16), np.diag([*spacing, 1.0]))
    _write_atomically(path, lambda temporary: nib.save(image, temporary))


def _discs(rng: np.random.RandomState) -> np.ndarray:
    """Bright discs of random number and size on a dark noisy background."""
    image, _ = create_test_image_2d(IMAGE_SIZE, IMAGE_SIZE, num_objs=int(rng.randint(3, 12)),
                                    rad_max=int(rng.randint(10, 28)), noise_max=float(rng.uniform(0.0, 0.2)),
                                    random_state=rng)
    return (image - image.min()) / max(float(np.ptp(image)), 1e-6)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(IMAGE_SIZE, dtype=np.float64), np.arange(IMAGE_SIZE, dtype=np.float64),
                       indexing="ij")


def _stripes(rng: np.random.RandomState) -> np.ndarray:
    """A straight sinusoidal grating of random orientation, period and phase, with speckle-like noise."""
    y, x = _grid()
    angle, period, phase = rng.uniform(0, np.pi), rng.uniform(8, 24), rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
    return np.clip(wave * rng.gamma(8.0, 1 / 8.0, wave.shape), 0.0, 1.0)


def _rings(rng: np.random.RandomState) -> np.ndarray:
    """Concentric rings around a random centre, blending two random colours; (H, W, 3)."""
    y, x = _grid()
    centre = rng.uniform(0.25, 0.75, 2) * IMAGE_SIZE
    radius = np.hypot(y - centre[0], x - centre[1])
    wave = 0.5 + 0.5 * np.cos(2 * np.pi * radius / rng.uniform(10, 24))
    colours = rng.uniform(0.0, 1.0, (2, 3))
    image = wave[..., None] * colours[0] + (1 - wave[..., None]) * colours[1]
    return np.clip(image + rng.normal(0.0, 0.03, image.shape), 0.0, 1.0)


def _ellipse(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    y, x = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return ((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2 <= 1.0


def _ct_phantom(rng: np.random.RandomState) -> np.ndarray:
    """A chest-like volume in HU: air around a soft-tissue body holding two lungs and a spine, radii varying
    smoothly along the last axis."""
    width, height, depth = VOLUME_SHAPE
    volume = np.full(VOLUME_SHAPE, -1000.0)
    body = rng.uniform(0.38, 0.45) * width, rng.uniform(0.28, 0.35) * height
    for z in range(depth):
        taper = 0.8 + 0.2 * np.sin(np.pi * (z + 0.5) / depth)
        plane = volume[:, :, z]
        plane[_ellipse((width, height), (width / 2, height / 2), (body[0] * taper, body[1] * taper))] = 40.0
        for side in (-1, 1):
            lung = _ellipse((width, height), (width / 2 + side * body[0] * 0.45, height / 2 - 2),
                            (body[0] * 0.35 * taper, body[1] * 0.6 * taper))
            plane[lung] = -850.0
        plane[_ellipse((width, height), (width / 2, height / 2 + body[1] * 0.6), (3.5, 3.5))] = 700.0
    return volume + rng.normal(0.0, 15.0, VOLUME_SHAPE)


def _mri_phantom(rng: np.random.RandomState) -> np.ndarray:
    """A head-like T1 volume in arbitrary MR units: bright scalp, dark skull, textured brain with two dark
    ventricles, Rician noise."""
    axes = [np.arange(size, dtype=np.float64) for size in VOLUME_SHAPE]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    centre = np.array(VOLUME_SHAPE) / 2 + rng.uniform(-2, 2, 3)
    radii = np.array(VOLUME_SHAPE) / 2 * rng.uniform(0.8, 0.95, 3)
    radius = np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                     + ((z - centre[2]) / radii[2]) ** 2)
    texture = gaussian_filter(rng.normal(size=VOLUME_SHAPE), 2.0)
    volume = np.where(radius <= 1.0, 1200.0, 0.0)
    volume[radius <= 0.9] = 150.0
    volume[radius <= 0.82] = 650.0 + 120.0 * (texture / texture.std())[radius <= 0.82]
    for side in (-1, 1):
        ventricle = np.sqrt(((x - centre[0] - side * 5) / 3) ** 2 + ((y - centre[1]) / 9) ** 2
                            + ((z - centre[2]) / 5) ** 2)
        volume[ventricle <= 1.0] = 100.0
    return np.hypot(volume + rng.normal(0.0, 25.0, VOLUME_SHAPE), rng.normal(0.0, 25.0, VOLUME_SHAPE))


def _phantoms(root: Path) -> list[SourceDataset]:
    entries = []
    for seed, (label, modality, draw) in enumerate(
        (("discs", "X-ray", _discs), ("stripes", "ultrasound", _stripes), ("rings", "colour", _rings))
    ):
        rng = np.random.RandomState(seed)
        folder = root / "phantoms" / label
        for number in range(IMAGES_PER_CLASS):
            image = draw(rng)  # drawn even when the file exists, so every file keeps its random state
            save_png(image, folder / f"{label}_{number:03d}.png")
        entries.append(SourceDataset(f"phantom-{label}", folder, modality, 2, label=label, format="png"))
    for seed, (label, modality, draw, spacing) in enumerate(
        (("ct-phantom", "CT", _ct_phantom, (1.0, 1.0, 2.5)), ("mri-phantom", "MRI", _mri_phantom, (1.0, 1.0, 1.0))),
        start=3,
    ):
        rng = np.random.RandomState(seed)
        folder = root / "phantoms" / label
        for number in range(VOLUMES_PER_CLASS):
            volume = draw(rng)
            _save_nifti(volume, spacing, folder / f"{label}_{number:03d}.nii.gz")
        entries.append(SourceDataset(label, folder, modality, 3, label=label, format="nifti"))
    return entries


def _testdata(name: str) -> Path | None:
    """A file shipped in pydicom's test data, never downloaded."""
    path = get_testdata_file(name, download=False)
    return Path(path) if isinstance(path, str) else None


def real_files(root: Path) -> list[SourceDataset]:
    """Copies the real images installed packages ship (pydicom, nibabel test files) under ``root``; their entries."""
    entries = []
    for name, modality in (("CT_small.dcm", "CT"), ("MR_small.dcm", "MRI")):
        source = _testdata(name)
        if source is None:
            logger.warning("pydicom's test file %s is not installed; left out", name)
            continue
        _copy(source, root / "dicom" / name)
        entries.append(SourceDataset(f"pydicom-{Path(name).stem}", root / "dicom" / name, modality, 2, format="dicom"))
    dicomdir = _testdata("DICOMDIR")
    series = dicomdir.parent.joinpath(*DICOM_SERIES) if dicomdir is not None else None
    if series is not None and series.is_dir():
        files = tuple(sorted(f for f in series.iterdir() if f.is_file()))
        try:
            slices = read_header(ImageSource(series, "dicom-series", files)).shape[2] if files else 0
        except ImageReadError as error:
            logger.warning("pydicom's DICOM series is not readable (%s); left out", error)
            slices = 0
        if slices > 1:
            target = root / "dicom-series" / DICOM_SERIES[-1]
            for file in files:
                _copy(file, target / file.name)
            entries.append(SourceDataset("pydicom-ct-series", target, "CT", 3, format="dicom-series"))
    anatomical = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    if anatomical.is_file():
        _copy(anatomical, root / "nifti" / anatomical.name)
        entries.append(SourceDataset("nibabel-anatomical", root / "nifti" / anatomical.name, "MRI", 3, format="nifti"))
    else:
        logger.warning("nibabel's test file %s is not installed; left out", anatomical)
    return entries


def prepare_embedded_data(root: str | Path) -> Path:
    """Create the embedded collection under ``root`` (idempotent: existing files are kept) and return the path
    of its ``manifest.json``."""
    root = Path(root).resolve()
    manifest = root / "manifest.json"
    entries = real_files(root) + _phantoms(root)
    if not manifest.exists():
        save_manifest(entries, manifest)
    return manifest

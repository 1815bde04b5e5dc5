"""A labelled multi-modality benchmark that separates self-supervised encoders, generated without download.

Every image shows a body (segmentation label 1) holding one lesion (label 2) whose **shape** is the class:
``disc``, ``ring``, ``cross`` or ``square``. What the label does not depend on varies freely, per image:

- the modality and its rendering: CT-like (Hounsfield units, random intensity window, Gaussian noise),
  MR-like (random T1/T2-like lesion contrast, strong bias field, Rician noise), X-ray-like (projected
  attenuation, exponential display, Poisson-like noise), ultrasound-like (fan-shaped field of view, depth
  attenuation, multiplicative speckle) and fundus-like colour photographs (random retina hue, vignetting);
- the geometry: rotation, isotropic scale, position of body and lesion, a smooth elastic deformation;
- a smooth multiplicative bias field on every modality.

So a feature that reads intensity, colour or noise statistics, as a random network's does, says little about
the class, and the benchmark is far from saturated for a random encoder while a supervised one solves it
(``docs/ssl_study.md`` reports both).

:func:`prepare_ssl_benchmark` writes under a root folder, deterministically (each image drawn from the split's
seed and its index), skipping files that exist:

- ``pool/``: the fixed pretraining pool (its shape labels are never written, the manifest labels entries by
  modality): independent images, or with ``slices_per_volume`` > 1 volumes of that many consecutive
  near-duplicate slices (a drawn image changing by a small smooth field from slice to slice, as adjacent slices of a
  CT or MR volume: the case where the paper says second-order matching matters), plus the real images installed packages ship: pydicom's ``CT_small.dcm``, ``MR_small.dcm`` and
  CT series, nibabel's ``anatomical.nii`` and the first volume of its 4D ``example4d.nii.gz`` (through
  :func:`scripts.data.embedded.real_files`); ``manifest.json`` lists them for ``configs/pretrain.json``;
- ``labelled/``: the ``training``, ``validation`` and ``test`` images (``*.png``, grey or RGB) and their masks
  (``*_mask.png``, values 0-2), balanced over modality x class;
- ``sizes.json``, the :class:`BenchmarkSizes` drawn (a root holding other sizes is refused);
- ``classification_datalist.json`` (``configs/train_cls.json``'s layout; its ``pool`` split holds the generated
  pool images with their classes, for a supervised ceiling only) and ``segmentation/datalist.json``
  (``configs/train.json``'s layout, ``labels`` 0 background, 1 body, 2 lesion) over the same labelled images.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from scripts.atomic_save import write_atomically
from scripts.data.embedded import real_files, save_png
from scripts.data.manifest import SourceDataset, save_manifest

__all__ = ["CLASSES", "MODALITIES", "BenchmarkSizes", "BenchmarkPaths", "draw_case", "prepare_ssl_benchmark"]

CLASSES = ("disc", "ring", "cross", "square")
# benchmark modality -> the manifest's modality name
MODALITIES = {"ct": "CT", "mr": "MRI", "xray": "X-ray", "ultrasound": "ultrasound", "fundus": "fundus"}
IMAGE_SIZE = 64
SEGMENTATION_LABELS = {"0": "background", "1": "body", "2": "lesion"}
_SPLIT_SEEDS = {"pool": 1, "training": 2, "validation": 3, "test": 4}


@dataclass(frozen=True)
class BenchmarkSizes:
    """Images per modality in the pretraining pool, and per (modality, class) pair in each labelled split;
    ``slices_per_volume`` > 1 makes the pool volumes of that many near-duplicate slices (same number of images)."""

    pool_per_modality: int = 96
    training_per_group: int = 5
    validation_per_group: int = 3
    test_per_group: int = 3
    slices_per_volume: int = 1

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BenchmarkSizes.{name} must be a positive integer, got {value!r}.")

    def per_group(self, split: str) -> int:
        return {"training": self.training_per_group, "validation": self.validation_per_group,
                "test": self.test_per_group}[split]


@dataclass(frozen=True)
class BenchmarkPaths:
    """Files written by :func:`prepare_ssl_benchmark`."""

    manifest: Path
    classification_datalist: Path
    segmentation_dir: Path


def _smooth_field(rng: np.random.RandomState, sigma: float, shape: tuple[int, int]) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation."""
    field = gaussian_filter(rng.normal(size=shape), sigma, mode="reflect")
    return field / max(float(field.std()), 1e-8)


def _warped_grid(rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Canonical coordinates (in pixels about the image centre) seen by each output pixel after a random rotation,
    isotropic scale in [0.8, 1.25] and a smooth elastic displacement of up to about 3 pixels."""
    half = IMAGE_SIZE / 2
    y, x = np.meshgrid(np.arange(IMAGE_SIZE) - half + 0.5, np.arange(IMAGE_SIZE) - half + 0.5, indexing="ij")
    angle, scale = rng.uniform(0, 2 * np.pi), np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    strength = rng.uniform(1.0, 3.0)
    y = y + strength * _smooth_field(rng, 6.0, y.shape)
    x = x + strength * _smooth_field(rng, 6.0, x.shape)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    return cos * y - sin * x, sin * y + cos * x


def _lesion(shape_class: str, y: np.ndarray, x: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Boolean mask of a lesion of ``shape_class`` centred at the origin of the coordinates ``(y, x)``."""
    cos, sin = np.cos(angle), np.sin(angle)
    v, u = cos * y - sin * x, sin * y + cos * x
    distance = np.hypot(v, u)
    if shape_class == "disc":
        return distance <= radius
    if shape_class == "ring":
        return (distance <= radius) & (distance >= 0.55 * radius)
    if shape_class == "cross":
        arm = 0.32 * radius
        return ((np.abs(v) <= arm) & (np.abs(u) <= radius)) | ((np.abs(u) <= arm) & (np.abs(v) <= radius))
    if shape_class == "square":
        return np.maximum(np.abs(v), np.abs(u)) <= 0.8 * radius
    raise ValueError(f"shape_class must be one of {CLASSES}, got {shape_class!r}.")


def _anatomy(rng: np.random.RandomState, shape_class: str) -> np.ndarray:
    """(H, W) label map: 0 outside the body, 1 body, 2 lesion, in warped coordinates."""
    y, x = _warped_grid(rng)
    radii = rng.uniform(24, 30), rng.uniform(24, 30)
    centre = rng.uniform(-3, 3, 2)
    body = ((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2 <= 1.0
    radius = rng.uniform(13, 18)
    # the lesion lies well inside the body: its centre at most (body radius - lesion radius - 2) from the body's
    direction = rng.uniform(0, 2 * np.pi)
    offset = rng.uniform(0, 1) * max(min(radii) - radius - 2, 0.0) * np.array([np.cos(direction), np.sin(direction)])
    lesion = _lesion(shape_class, y - centre[0] - offset[0], x - centre[1] - offset[1], radius, rng.uniform(0, np.pi))
    labels = body.astype(np.uint8)
    labels[lesion & body] = 2
    return labels


def _bias(rng: np.random.RandomState, strength: float) -> np.ndarray:
    return np.exp(strength * _smooth_field(rng, 16.0, (IMAGE_SIZE, IMAGE_SIZE)))


def _ct(rng: np.random.RandomState, labels: np.ndarray) -> np.ndarray:
    """Hounsfield units (air -1000, soft tissue, lesion +-30..150 HU) through a random window."""
    tissue = rng.uniform(0, 80)
    hu = np.where(labels > 0, tissue + 15 * _smooth_field(rng, 3.0, labels.shape), -1000.0)
    hu[labels == 2] += rng.choice([-1, 1]) * rng.uniform(60, 200)
    hu = hu * _bias(rng, 0.05) + rng.normal(0, rng.uniform(5, 30), labels.shape)
    level, width = rng.uniform(-60, 120), rng.uniform(300, 1000)
    return np.clip((hu - level + width / 2) / width, 0, 1)


def _mr(rng: np.random.RandomState, labels: np.ndarray) -> np.ndarray:
    """Arbitrary MR units: lesion brighter or darker than tissue (T1/T2-like), strong bias field, Rician noise."""
    tissue = rng.uniform(0.35, 0.65)
    image = np.where(labels > 0, tissue * (1 + 0.15 * _smooth_field(rng, 2.0, labels.shape)), 0.02)
    image[labels == 2] = tissue + rng.choice([-1, 1]) * rng.uniform(0.15, 0.35)
    image = image * _bias(rng, rng.uniform(0.2, 0.45))
    sigma = rng.uniform(0.02, 0.07)
    image = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    return image / max(float(np.percentile(image, 99.5)), 1e-6)


def _xray(rng: np.random.RandomState, labels: np.ndarray) -> np.ndarray:
    """Projected attenuation (thickest at the body's centre), exponential display, Poisson-like noise."""
    body = labels > 0
    thickness = gaussian_filter(body.astype(float), rng.uniform(3, 6))
    lesion = rng.choice([-1, 1]) * rng.uniform(0.3, 0.6) * (labels == 2)
    attenuation = rng.uniform(0.5, 1.0) * thickness + lesion
    attenuation = gaussian_filter(attenuation, 0.7) + 0.1 * _smooth_field(rng, 20.0, labels.shape)
    image = 1.0 - np.exp(-np.clip(attenuation, 0, None))
    counts = rng.uniform(150, 600)
    image = rng.poisson(np.clip(image, 0, 1) * counts) / counts
    return np.clip(image * _bias(rng, 0.1), 0, 1) ** rng.uniform(0.7, 1.4)


def _ultrasound(rng: np.random.RandomState, labels: np.ndarray) -> np.ndarray:
    """Echogenicity inside a fan-shaped field of view, attenuation with depth, multiplicative speckle."""
    y, x = np.meshgrid(np.arange(IMAGE_SIZE, dtype=float), np.arange(IMAGE_SIZE, dtype=float) - IMAGE_SIZE / 2,
                       indexing="ij")
    fan = (np.abs(np.arctan2(x, y + 6)) <= rng.uniform(0.5, 0.8)) & (np.hypot(x, y + 6) <= IMAGE_SIZE + 4)
    tissue = rng.uniform(0.4, 0.7)
    echo = np.where(labels > 0, tissue, 0.1)
    echo[labels == 2] = np.clip(tissue + rng.choice([-1, 1]) * rng.uniform(0.25, 0.5), 0.03, 1.0)
    speckle = gaussian_filter(rng.rayleigh(1.0, labels.shape), rng.uniform(0.5, 1.2))
    image = echo * speckle / speckle.mean() * np.exp(-rng.uniform(0.005, 0.03) * y)
    return np.clip(image * fan * _bias(rng, 0.15), 0, 1)


def _fundus(rng: np.random.RandomState, labels: np.ndarray) -> np.ndarray:
    """(H, W, 3) colour photograph: retina of random hue in a dark surround, lesion of another colour, vignetting."""
    retina = np.array([rng.uniform(0.55, 0.95), rng.uniform(0.2, 0.5), rng.uniform(0.05, 0.25)])
    shift = rng.normal(size=3)
    lesion = np.clip(retina + rng.uniform(0.25, 0.5) * shift / np.linalg.norm(shift), 0, 1)
    image = np.zeros((*labels.shape, 3))
    image[labels == 1] = retina
    image[labels == 2] = lesion
    texture = 1 + 0.1 * _smooth_field(rng, 1.5, labels.shape)
    y, x = np.meshgrid(np.linspace(-1, 1, IMAGE_SIZE), np.linspace(-1, 1, IMAGE_SIZE), indexing="ij")
    vignette = 1 - rng.uniform(0.2, 0.6) * (y**2 + x**2) / 2
    image = image * (texture * vignette * _bias(rng, 0.1))[..., None]
    return np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)


_RENDERERS: dict[str, Callable[[np.random.RandomState, np.ndarray], np.ndarray]] = {
    "ct": _ct, "mr": _mr, "xray": _xray, "ultrasound": _ultrasound, "fundus": _fundus,
}


def draw_case(rng: np.random.RandomState, modality: str, shape_class: str) -> tuple[np.ndarray, np.ndarray]:
    """One image and its label map.

    Args:
        rng: the random state (everything but the modality and the class is drawn from it).
        modality: one of :data:`MODALITIES`' keys.
        shape_class: one of :data:`CLASSES`.

    Returns:
        the image in [0, 1], (64, 64) grey or (64, 64, 3) colour (fundus), and the (64, 64) uint8 label map
        (0 background, 1 body, 2 lesion).
    """
    if modality not in _RENDERERS:
        raise ValueError(f"modality must be one of {sorted(_RENDERERS)}, got {modality!r}.")
    if shape_class not in CLASSES:
        raise ValueError(f"shape_class must be one of {CLASSES}, got {shape_class!r}.")
    labels = _anatomy(rng, shape_class)
    return np.clip(_RENDERERS[modality](rng, labels), 0.0, 1.0).astype(np.float32), labels


def _save_mask(labels: np.ndarray, path: Path) -> None:
    """A label map saved losslessly as an 8-bit PNG of its integer values."""
    if not path.exists():
        write_atomically(path, lambda temporary: Image.fromarray(labels.astype(np.uint8)).save(temporary, format="PNG"))


def _draw_split(root: Path, split: str, sizes: BenchmarkSizes) -> list[dict[str, str]]:
    """Writes one labelled split, drawn in a fixed order; returns its items with paths relative to ``root``."""
    rng = np.random.RandomState(_SPLIT_SEEDS[split])
    items = []
    for number in range(sizes.per_group(split)):
        for modality in MODALITIES:
            for shape_class in CLASSES:
                image, labels = draw_case(rng, modality, shape_class)  # drawn even when the files exist
                name = f"labelled/{split}/{modality}_{shape_class}_{number:03d}"
                save_png(image, root / f"{name}.png")
                _save_mask(labels, root / f"{name}_mask.png")
                items.append({"image": f"{name}.png", "mask": f"{name}_mask.png", "label": shape_class})
    return items


def _draw_slice_pool(root: Path, sizes: BenchmarkSizes) -> tuple[list[SourceDataset], list[dict[str, str]]]:
    """The pool as volumes of ``sizes.slices_per_volume`` near-duplicate slices (NIfTI, grey, values in [0, 1],
    slices along the last axis); one manifest entry per modality, no labelled items (a slice has no file of its own
    for the supervised ceiling)."""
    rng = np.random.RandomState(_SPLIT_SEEDS["pool"])
    depth = sizes.slices_per_volume
    for number in range(-(-sizes.pool_per_modality // depth)):
        for modality in MODALITIES:
            target = root / "pool" / modality / f"{modality}_{number:04d}.nii.gz"
            image, _ = draw_case(rng, modality, CLASSES[rng.randint(len(CLASSES))])  # drawn even when files exist
            drift = 0.1 * _smooth_field(rng, 6.0, image.shape[:2])
            if target.exists():
                continue
            grey = image if image.ndim == 2 else image.mean(-1)
            volume = np.stack([grey + drift * index / depth for index in range(depth)], axis=-1)
            nifti = nib.Nifti1Image(np.clip(volume, 0.0, 1.0).astype(np.float32), np.eye(4))
            write_atomically(target, lambda temporary: nib.save(nifti, temporary))
    entries = [SourceDataset(f"generated-{modality}-volumes", root / "pool" / modality, name, 3, slice_axis=2,
                             window=(0.0, 1.0), format="nifti") for modality, name in MODALITIES.items()]
    return entries, []


def _draw_pool(root: Path, sizes: BenchmarkSizes) -> tuple[list[SourceDataset], list[dict[str, str]]]:
    """Writes the generated part of the pretraining pool; returns one manifest entry per modality and the pool's
    labelled items (for the supervised ceiling only: pretraining never reads them)."""
    if sizes.slices_per_volume > 1:
        return _draw_slice_pool(root, sizes)
    rng = np.random.RandomState(_SPLIT_SEEDS["pool"])
    items = []
    for number in range(sizes.pool_per_modality):
        for modality in MODALITIES:
            shape_class = CLASSES[rng.randint(len(CLASSES))]
            image, _ = draw_case(rng, modality, shape_class)
            name = f"pool/{modality}/{modality}_{number:04d}.png"
            save_png(image, root / name)
            items.append({"image": name, "label": shape_class})
    entries = [SourceDataset(f"generated-{modality}", root / "pool" / modality, name, 2, format="png")
               for modality, name in MODALITIES.items()]
    return entries, items


def _first_volume_of_example4d(root: Path) -> list[SourceDataset]:
    """nibabel's 4D functional MRI test file, its first volume as a 3D NIfTI (the pool takes 2D and 3D images)."""
    source = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    if not source.is_file():
        return []
    target = root / "pool" / "nibabel-example4d-volume0.nii.gz"
    if not target.exists():
        image = nib.load(source)
        volume = nib.Nifti1Image(np.asarray(image.dataobj[..., 0]), image.affine)
        write_atomically(target, lambda temporary: nib.save(volume, temporary))
    return [SourceDataset("nibabel-example4d", target, "MRI", 3, format="nifti")]


def prepare_ssl_benchmark(root: str | Path, sizes: BenchmarkSizes | None = None) -> BenchmarkPaths:
    """Writes the benchmark under ``root`` (see the module docstring) unless it is there, and returns its files.

    Args:
        root: the benchmark's folder; give different sizes different folders.
        sizes: how many images to draw; defaults to :class:`BenchmarkSizes()`.
    """
    sizes = sizes if sizes is not None else BenchmarkSizes()
    if not isinstance(sizes, BenchmarkSizes):
        raise TypeError(f"sizes must be a BenchmarkSizes, got {type(sizes).__name__}.")
    root = Path(root).resolve()
    manifest = root / "pool" / "manifest.json"
    classification = root / "classification_datalist.json"
    segmentation = root / "segmentation"
    paths = BenchmarkPaths(manifest, classification, segmentation)
    stamp, wanted = root / "sizes.json", json.dumps(asdict(sizes), sort_keys=True)
    if stamp.is_file() and stamp.read_text() != wanted:
        raise ValueError(f"{root} holds a benchmark of sizes {stamp.read_text()}, not {wanted}: use another root "
                         "or delete the folder.")
    if manifest.is_file() and classification.is_file() and (segmentation / "datalist.json").is_file():
        return paths
    write_atomically(stamp, lambda temporary: temporary.write_text(wanted))
    generated, pool_items = _draw_pool(root, sizes)
    entries = real_files(root / "pool" / "real") + _first_volume_of_example4d(root) + generated
    splits = {split: _draw_split(root, split, sizes) for split in ("training", "validation", "test")}
    classification_text = json.dumps(
        {"classes": list(CLASSES), "pool": pool_items,
         **{split: [{"image": item["image"], "label": item["label"]} for item in items] for split, items in splits.items()}},
        indent=1,
    )
    segmentation_text = json.dumps(
        {"description": "ssl_benchmark: body and lesion masks", "labels": SEGMENTATION_LABELS,
         **{split: [{"image": f"../{item['image']}", "label": f"../{item['mask']}"} for item in items]
            for split, items in splits.items()}},
        indent=1,
    )
    write_atomically(classification, lambda temporary: temporary.write_text(classification_text))
    write_atomically(segmentation / "datalist.json", lambda temporary: temporary.write_text(segmentation_text))
    save_manifest(entries, manifest)  # last: a manifest means the benchmark is complete
    return paths

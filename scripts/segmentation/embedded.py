"""Labelled synthetic segmentation data written at first use, so the segmentation workflows run offline.

Images come from MONAI's ``create_test_image_2d``/``create_test_image_3d``: noisy backgrounds with discs (2D) or
spheres (3D) of two intensities; the label of each object is its intensity level (1 = dim, 2 = bright). 2D
cases are written as 8-bit PNG pairs, 3D cases as NIfTI pairs whose objects fill only the central slices (a
third of the slices hold no foreground, as in real volumes, so that balanced slice sampling matters) and whose
affine has anisotropic spacing and an offset origin (so that geometry preservation can be checked).

Layout under ``root/embedded_2d`` or ``root/embedded_3d`` (Medical Segmentation Decathlon style)::

    imagesTr/ labelsTr/ imagesVal/ labelsVal/ imagesTs/ labelsTs/ datalist.json

``datalist.json`` lists ``training``, ``validation`` and ``test`` pairs with paths relative to its folder and
the label names under ``labels``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data.synthetic import create_test_image_2d, create_test_image_3d
from PIL import Image

from scripts.atomic_save import write_atomically

__all__ = ["LABEL_NAMES", "SPLITS", "prepare_segmentation_data"]

LABEL_NAMES = {"0": "background", "1": "dim object", "2": "bright object"}
# split name in datalist.json -> (image folder, label folder, cases in 2D, cases in 3D)
SPLITS = {
    "training": ("imagesTr", "labelsTr", 24, 8),
    "validation": ("imagesVal", "labelsVal", 8, 2),
    "test": ("imagesTs", "labelsTs", 8, 2),
}
_SIZE_2D = 96
_SHAPE_3D = (64, 64, 36)  # the central 24 slices hold objects, 6 empty slices on each side
_EMPTY_SLICES = 6
_AFFINE_3D = np.array([[0.8, 0, 0, -25.0], [0, 0.8, 0, -30.0], [0, 0, 2.0, 10.0], [0, 0, 0, 1]])
_NOISE = 0.3


def _case_2d(rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    image, label = create_test_image_2d(_SIZE_2D, _SIZE_2D, num_objs=6, rad_max=14, rad_min=5, noise_max=_NOISE,
                                        num_seg_classes=2, random_state=rng)
    return (image * 255).round().astype(np.uint8), label.astype(np.uint8)


def _case_3d(rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    height, width, depth = _SHAPE_3D
    core = depth - 2 * _EMPTY_SLICES
    image, label = create_test_image_3d(height, width, core, num_objs=4, rad_max=10, rad_min=4, noise_max=_NOISE,
                                        num_seg_classes=2, random_state=rng)
    # empty slices get the background noise of the core: uniform up to noise_max * classes, rescaled by the max (2)
    before, after = (rng.uniform(0, _NOISE, size=(height, width, _EMPTY_SLICES)) for _ in range(2))
    image = np.concatenate([before, image, after], axis=2).astype(np.float32)
    label = np.pad(label, ((0, 0), (0, 0), (_EMPTY_SLICES, _EMPTY_SLICES))).astype(np.uint8)
    return image, label


def _write_png(array: np.ndarray, path: Path) -> None:
    write_atomically(path, lambda temporary: Image.fromarray(array).save(temporary, format="PNG"))


def _write_nifti(array: np.ndarray, path: Path) -> None:
    write_atomically(path, lambda temporary: nib.save(nib.Nifti1Image(array, _AFFINE_3D), temporary))


def _complete(folder: Path) -> bool:
    datalist = folder / "datalist.json"
    if not datalist.is_file():
        return False
    entries = json.loads(datalist.read_text())
    return all((folder / item[key]).is_file() for split in SPLITS for item in entries[split] for key in item)


def prepare_segmentation_data(root: str | Path, volumetric: bool = False, seed: int = 0) -> str:
    """Writes the embedded 2D (PNG) or 3D (NIfTI) segmentation cases under ``root`` unless they are there already.

    Args:
        root: parent folder; the cases go to ``root/embedded_2d`` or ``root/embedded_3d``.
        volumetric: write 3D volumes instead of 2D images.
        seed: seed of the synthetic cases (each case is drawn from ``seed`` and its index).

    Returns:
        the folder holding ``datalist.json`` (a string, for use in bundle configs).
    """
    folder = Path(root) / ("embedded_3d" if volumetric else "embedded_2d")
    if _complete(folder):
        return str(folder)
    suffix, make, write = (".nii.gz", _case_3d, _write_nifti) if volumetric else (".png", _case_2d, _write_png)
    entries: dict[str, object] = {"description": __doc__.splitlines()[0], "labels": LABEL_NAMES}
    index = 0
    for split, (image_dir, label_dir, count_2d, count_3d) in SPLITS.items():
        pairs = []
        for _ in range(count_3d if volumetric else count_2d):
            image, label = make(np.random.RandomState(seed * 100_003 + index))
            name = f"case_{index:03d}{suffix}"
            write(image, folder / image_dir / name)
            write(label, folder / label_dir / name)
            pairs.append({"image": f"{image_dir}/{name}", "label": f"{label_dir}/{name}"})
            index += 1
        entries[split] = pairs
    text = json.dumps(entries, indent=2)
    write_atomically(folder / "datalist.json", lambda temporary: temporary.write_text(text))
    return str(folder)

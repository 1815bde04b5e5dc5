"""DICOM Segmentation (DICOM-SEG) objects for masks predicted on DICOM inputs, written with highdicom.

A mask comes out of the inference pipeline in the geometry MONAI loaded the input with: an array indexed like the
loaded image, whose affine maps voxel indices to RAS millimetres. A DICOM-SEG object references its source images
instance by instance, one frame per (source image, segment). So each source instance's pixel grid is placed in
patient space from its own ImagePositionPatient, ImageOrientationPatient and PixelSpacing (DICOM PS3.3 C.7.6.2.1.1;
LPS), and the mask is sampled there (nearest voxel). This holds whatever order and orientation the reader gave the
loaded volume (ITK or pydicom, sorted by position or not), since only the affine ties the mask to the patient.
highdicom (Herrmann et al., "Highdicom: a Python library for standardized encoding of image annotations and
machine learning model outputs in pathology and radiology", J Digit Imaging 2022) writes the object: segment
descriptions, the source series reference and the per-frame source image references.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

__all__ = ["read_source_instances", "sample_mask_on_instances", "write_dicom_seg"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_SOFTWARE = "LVM-Med MONAI bundle"


def read_source_instances(source: str | os.PathLike) -> list[pydicom.Dataset]:
    """The image instances of a DICOM file or of a folder holding one series, sorted along the slice normal.

    Raises:
        ValueError: no DICOM image in ``source``, or instances of more than one series.
    """
    source = Path(source)
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    instances = []
    for path in files:
        try:
            dataset = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue  # a non-DICOM file beside the series (e.g. a DICOMDIR or a text note)
        if "PixelData" in dataset and "ImagePositionPatient" in dataset:
            instances.append(dataset)
    if not instances:
        raise ValueError(f"source {source} holds no DICOM image with a position (ImagePositionPatient).")
    series = {str(d.SeriesInstanceUID) for d in instances}
    if len(series) != 1:
        raise ValueError(f"source {source} holds {len(series)} series; a DICOM-SEG references one: {sorted(series)}.")
    normal = np.cross(*np.asarray(instances[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    return sorted(instances, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, dtype=float))))


def sample_mask_on_instances(mask: np.ndarray, affine: np.ndarray, instances: Sequence[pydicom.Dataset]) -> np.ndarray:
    """The mask on each instance's pixel grid: (instances, Rows, Columns), nearest voxel, 0 outside the mask.

    Args:
        mask: class indices (X, Y, Z) or (X, Y) in the loaded image's voxel grid.
        affine: (4, 4) voxel index -> RAS millimetres of ``mask`` (MONAI's ``MetaTensor.affine``).
        instances: the source images.
    """
    if mask.ndim == 2:
        mask = mask[..., None]
    if mask.ndim != 3:
        raise ValueError(f"mask must have shape (X, Y) or (X, Y, Z), got {mask.shape}.")
    to_voxel = np.linalg.inv(np.asarray(affine, dtype=float))
    frames = np.zeros((len(instances), int(instances[0].Rows), int(instances[0].Columns)), dtype=np.uint8)
    for index, instance in enumerate(instances):
        rows, columns = int(instance.Rows), int(instance.Columns)
        row_direction, column_direction = np.asarray(instance.ImageOrientationPatient, dtype=float).reshape(2, 3)
        row_spacing, column_spacing = (float(s) for s in instance.PixelSpacing)
        r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
        # PS3.3 C.7.6.2.1.1: the pixel (row r, column c) lies at IPP + c * dc * row_direction + r * dr * column_direction
        lps = (np.asarray(instance.ImagePositionPatient, dtype=float)[:, None]
               + np.outer(row_direction, c.ravel() * column_spacing) + np.outer(column_direction, r.ravel() * row_spacing))
        voxels = np.rint(to_voxel[:3, :3] @ (_LPS_TO_RAS @ lps) + to_voxel[:3, 3:]).astype(int)
        inside = np.all((voxels >= 0) & (voxels < np.asarray(mask.shape)[:, None]), axis=0)
        values = np.zeros(rows * columns, dtype=np.uint8)
        values[inside] = mask[voxels[0, inside], voxels[1, inside], voxels[2, inside]]
        frames[index] = values.reshape(rows, columns)
    return frames


def write_dicom_seg(
    mask: np.ndarray,
    affine: np.ndarray,
    source: str | os.PathLike,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    series_description: str = "LVM-Med segmentation",
) -> Path:
    """Writes ``mask`` as a binary DICOM-SEG object referencing the source series, one segment per foreground class.

    Args:
        mask: class indices (X, Y, Z) or (X, Y), 0 = background, in the loaded image's voxel grid.
        affine: (4, 4) voxel index -> RAS millimetres of ``mask``.
        source: the DICOM file or series folder the mask was predicted on.
        path: the ``.dcm`` file to write (its folder is created).
        class_names: names of classes 1, 2, ... (segment labels); default ``class 1``, ``class 2``, ...
        series_description: SeriesDescription of the new series.

    Returns:
        ``path``. Frames with no foreground are left out (highdicom's default), so an all-background mask gives an
        object without frames.

    Raises:
        ValueError: a class index above ``len(class_names)``, or a source that is not one DICOM series.
    """
    mask = np.asarray(mask)
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"mask must hold class indices in [0, 255], got values in [{mask.min()}, {mask.max()}].")
    mask = mask.astype(np.uint8)
    num_classes = int(mask.max()) if class_names is None else len(class_names)
    if int(mask.max()) > num_classes:
        raise ValueError(f"mask holds class {int(mask.max())} but class_names names {num_classes}: {list(class_names or [])}.")
    names = list(class_names) if class_names is not None else [f"class {k}" for k in range(1, num_classes + 1)]
    instances = read_source_instances(source)
    frames = sample_mask_on_instances(mask, affine, instances)
    algorithm = hd.AlgorithmIdentificationSequence(name=_SOFTWARE, family=codes.DCM.ArtificialIntelligence, version="1")
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in enumerate(names, start=1)
    ]
    segmentation = hd.seg.Segmentation(
        source_images=instances, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=int(instances[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=_SOFTWARE, manufacturer_model_name="segmentation",
        software_versions="1", device_serial_number="none", series_description=series_description,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    segmentation.save_as(path)
    return path

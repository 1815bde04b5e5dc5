"""DICOM-SEG output for DICOM inputs (scripts/segmentation/dicom_seg.py, SaveMaskd): read back with pydicom, each
frame must reference the right source instance and hold the mask of that instance, computed here from the
source's own pixels (pydicom, modality LUT) rather than from the loaded volume; NIfTI inputs keep NIfTI masks."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from conftest import REPO_ROOT
from scripts.networks.transunet import TransUNet
from scripts.segmentation.transforms import SaveMaskd
from test_seg_workflows import run, workflow

CT_SERIES = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"  # 5 slices
THRESHOLDS = (-50.0, 20.0)  # class 1: HU in (t1, t2], class 2: HU > t2: both present on every shipped CT slice


def _copy_series_shuffled(tmp_path: Path) -> Path:
    """The shipped 5-slice CT series under names in reverse slice order, with a non-DICOM file beside it."""
    folder = tmp_path / "CT5N"
    folder.mkdir()
    files = sorted(CT_SERIES.iterdir())
    for index, path in enumerate(files):
        shutil.copy(path, folder / f"{len(files) - index:02d}.dcm")
    (folder / "README.txt").write_text("not DICOM")
    return folder


def _classes(values: np.ndarray) -> np.ndarray:
    return (values > THRESHOLDS[0]).astype(np.uint8) + (values > THRESHOLDS[1]).astype(np.uint8)


def _predicted_mask(source: Path) -> MetaTensor:
    """A 'prediction' in the loaded geometry, as inference hands it to SaveMaskd: classes of the loaded values."""
    image = LoadImage(image_only=True)(str(source))
    mask = torch.from_numpy(_classes(image.numpy()))[None]
    return MetaTensor(mask, meta=dict(image.meta))  # the loaded image's geometry and file name


def _check_frames(seg_path: Path, source: Path) -> None:
    seg = pydicom.dcmread(seg_path)
    instances = {}
    for path in ([source] if source.is_file() else source.iterdir()):
        if path.suffix == ".dcm":
            dataset = pydicom.dcmread(path)
            instances[str(dataset.SOPInstanceUID)] = dataset
    first = next(iter(instances.values()))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["bone-like", "dense"]
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    expected_frames = 0
    for uid, dataset in instances.items():
        classes = _classes(apply_modality_lut(dataset.pixel_array, dataset))
        expected_frames += sum(bool((classes == k).any()) for k in (1, 2))
    assert len(frames) == expected_frames > 0
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        expected = _classes(apply_modality_lut(instances[uid].pixel_array, instances[uid])) == segment
        np.testing.assert_array_equal(frame.astype(bool), expected, err_msg=f"frame of {uid}, segment {segment}")


@pytest.mark.parametrize("kind", ["series", "single file"])
def test_dicom_masks_are_dicom_seg_with_each_frame_on_its_source_instance(tmp_path: Path, kind: str) -> None:
    source = _copy_series_shuffled(tmp_path) if kind == "series" else Path(get_testdata_file("CT_small.dcm"))
    save = SaveMaskd("pred", output_dir=tmp_path / "out", class_names=["bone-like", "dense"])
    save({"pred": _predicted_mask(source)})
    seg_path = tmp_path / "out" / f"{source.stem}_seg.dcm"
    assert seg_path.is_file(), sorted((tmp_path / "out").iterdir())
    _check_frames(seg_path, source)


def test_nifti_inputs_keep_nifti_and_dicom_seg_can_be_switched_off(tmp_path: Path) -> None:
    image = np.random.default_rng(0).uniform(0, 2000, (8, 8, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([0.5, 0.5, 2.0, 1.0])), tmp_path / "scan.nii.gz")
    save = SaveMaskd("pred", output_dir=tmp_path / "out", print_log=False)
    save({"pred": _predicted_mask(tmp_path / "scan.nii.gz")})
    written = nib.load(tmp_path / "out" / "scan_seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(written.dataobj), _classes(image))
    SaveMaskd("pred", output_dir=tmp_path / "nifti", dicom_seg=False, print_log=False)(
        {"pred": _predicted_mask(Path(get_testdata_file("CT_small.dcm")))})
    assert [p.name for p in (tmp_path / "nifti").iterdir()] == ["CT_small_seg.nii.gz"]


def test_a_class_without_a_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mask holds class 2 but class_names names 1"):
        SaveMaskd("pred", output_dir=tmp_path, class_names=["only"])({"pred": _predicted_mask(CT_SERIES)})


def test_inference_config_writes_dicom_seg_for_a_dicom_series(tmp_path: Path) -> None:
    """configs/inference.json on a DICOM series folder (a small TransUNet checkpoint): a DICOM-SEG referencing it."""
    options = {"vit_img_size": 32, "vit_args": {"embed_dim": 16, "depth": 1, "num_heads": 2, "global_attn_indexes": [0],
                                                  "window_size": 2}, "skip_channels": [4, 4, 4, 4]}
    torch.save(TransUNet(1, 3, **options).state_dict(), tmp_path / "model.pt")
    series = _copy_series_shuffled(tmp_path)
    run(workflow("inference.json", "infer", datalist=[{"image": str(series)}], checkpoint=str(tmp_path / "model.pt"),
                 architecture="transunet", network_options=options, image_size=32, output_dir=str(tmp_path / "out"),
                 bundle_root=str(REPO_ROOT)))
    seg = pydicom.dcmread(tmp_path / "out" / "CT5N_seg.dcm")
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) == 2
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(next(CT_SERIES.iterdir())).SeriesInstanceUID
    uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in CT_SERIES.iterdir()}
    for group in getattr(seg, "PerFrameFunctionalGroupsSequence", []):
        assert group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID in uids

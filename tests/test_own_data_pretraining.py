"""Pretraining on one's own data (issue 22, item 7): modality from DICOM tags and folder names, shown by the
manifest tools; monitors on the user's images and a labelled datalist; continuing from the official weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_exports import dicom_dataset, save, smooth_image
from scripts import make_manifest, manifest_report
from scripts.data.folder_scan import folder_modality, scan_folder
from scripts.data.slices import PretrainSliceDataset


def _png(path: Path, seed: int = 0, size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(smooth_image(size, 255, seed=seed)).save(path)
    return path


def _own_tree(root: Path) -> Path:
    """Folders as users name them; DICOM files with and without a known Modality tag."""
    _png(root / "ct" / "a.png")
    _png(root / "chest-xray" / "a.png")
    _png(root / "MRI_brain" / "case1" / "a.png")  # a folder above names the modality
    _png(root / "scans" / "a.png")  # nothing names it
    save(dicom_dataset(smooth_image((16, 16), 4095), modality="CR"), root / "exports" / "1.dcm")
    save(dicom_dataset(smooth_image((16, 16), 255), modality="OT"), root / "us" / "1.dcm")  # tag says nothing
    save(dicom_dataset(smooth_image((16, 16), 4095), modality="MR"), root / "ct_old" / "1.dcm")  # the tag wins
    return root


EXPECTED = {  # dataset -> (modality, where it came from)
    "ct": ("CT", "folder name 'ct'"),
    "chest-xray": ("X-ray", "folder name 'chest-xray'"),
    "MRI_brain/case1": ("MRI", "folder name 'MRI_brain'"),
    "scans": ("other", "none found"),
    "exports": ("X-ray", "DICOM Modality CR"),
    "us": ("ultrasound", "folder name 'us'"),
    "ct_old": ("MRI", "DICOM Modality MR"),
}


def test_folder_names_give_modalities() -> None:
    expected = {"ct": "CT", "CT_scans": "CT", "mr": "MRI", "mri": "MRI", "Brain-MRI": "MRI", "xray": "X-ray",
                "x-ray": "X-ray", "chest_x-ray": "X-ray", "CR": "X-ray", "dx": "X-ray", "us": "ultrasound",
                "Ultrasound": "ultrasound", "fundus": "fundus", "pet": "PET", "ultrasounds_2020": None,
                "mristudy": None, "patients": None, "other": None, "pt_001": None}
    assert {name: folder_modality(name) for name in expected} == expected


def test_modality_from_dicom_tags_and_folder_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _own_tree(tmp_path / "mine")
    scanned, unreadable = scan_folder(root)
    assert not unreadable
    assert {item.entry.name: (item.entry.modality, item.modality_source) for item in scanned} == EXPECTED
    # an override still wins over both
    overridden = {item.entry.name: item.entry.modality for item in scan_folder(root, {"ct_old": "CT"})[0]}
    assert overridden["ct_old"] == "CT"

    assert make_manifest.main([str(root), "--output", str(tmp_path / "manifest.json")]) == 0
    printed = capsys.readouterr().out
    assert "modality from folder name 'chest-xray'" in printed and "modality from DICOM Modality CR" in printed
    assert "note: modality not found for 1 dataset(s) (scans)" in printed

    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert manifest_report.main([str(root)]) == 0
    report = capsys.readouterr().out
    for name, (modality, source) in EXPECTED.items():
        line = next(line for line in report.splitlines() if line.startswith(name + " "))
        assert line.split()[1] == modality and source in line, line
    assert "note: modality not found for 1 dataset(s) (scans)" in report
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written into the data folder
    assert not list(tmp_path.glob("*.headers.json"))


def test_a_folder_is_a_manifest_for_pretraining(tmp_path: Path) -> None:
    root = _own_tree(tmp_path / "mine")
    dataset = PretrainSliceDataset(root, on_error="raise")
    assert sorted(set(dataset.modalities)) == ["CT", "MRI", "X-ray", "other", "ultrasound"]
    assert dataset.modality_sources["exports"] == "DICOM Modality CR"
    assert dataset[0]["image"].shape[0] in (1, 3)

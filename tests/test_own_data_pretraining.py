"""Pretraining on one's own data (issue 22, item 7): modality from DICOM tags and folder names, shown by the
manifest tools; monitors on the user's images and a labelled datalist; continuing from the official weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from conftest import REPO_ROOT

from dicom_exports import dicom_dataset, save, smooth_image
from scripts import make_manifest, manifest_report
from scripts.data.folder_scan import folder_modality, scan_folder
from scripts.data.slices import PretrainSliceDataset
from scripts.networks.resnet_encoder import ResNet50Encoder


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


def _fake_lvmmed_resnet(path: Path) -> dict[str, torch.Tensor]:
    """A file in the layout of the LVM-Med release ``lvmmed_resnet.torch``: torchvision ResNet-50 keys, with the
    ``fc.*`` classifier; returns the encoder's weights it holds."""
    encoder = ResNet50Encoder()
    state = encoder.state_dict()
    torch.save({**state, "fc.weight": torch.randn(1000, 2048) * 0.01, "fc.bias": torch.zeros(1000)}, path)
    return state


def _own_folder_and_knn_datalist(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "my_scans"
    for k in range(16):
        _png(root / "mr" / f"{k}.png", seed=k, size=(40, 40))
        _png(root / "xray" / f"{k}.png", seed=100 + k, size=(40, 40))
    items = [{"image": str(root / folder / f"{k}.png"), "label": folder} for folder in ("mr", "xray") for k in range(4)]
    knn = tmp_path / "knn.json"
    knn.write_text(json.dumps({"classes": ["mr", "xray"], "training": items}))
    return root, knn


def test_pretrain_config_reads_a_folder_the_release_and_a_knn_datalist(tmp_path: Path) -> None:
    """What the domain-adaptive command resolves to, without training: the encoder holds the release's weights,
    the monitors read the user's folder and datalist and say so."""
    root, knn = _own_folder_and_knn_datalist(tmp_path)
    released = _fake_lvmmed_resnet(tmp_path / "lvmmed_resnet.torch")
    parser = ConfigParser()
    parser.read_config(REPO_ROOT / "configs" / "pretrain.json")
    parser.update({"bundle_root": str(REPO_ROOT), "manifest": str(root), "knn_datalist": str(knn), "image_size": 32,
                   "pretrained_encoder": str(tmp_path / "lvmmed_resnet.torch"), "monitor_samples": 10})
    encoder = parser.get_parsed_content("network_def").encoder
    for name, value in released.items():
        assert torch.equal(encoder.state_dict()[name], value), name
    slices = parser.get_parsed_content("train#slices")
    assert sorted(set(slices.modalities)) == ["MRI", "X-ray"] and len(slices) == 32
    assert len(parser.get_parsed_content("train#monitor_data").dataset) == 10  # spread over both folders
    assert len(parser.get_parsed_content("train#knn_data").dataset) == 8
    monitor = next(handler for handler in parser.get_parsed_content("train#handlers")
                   if type(handler).__name__ == "EmbeddingMonitor")
    assert monitor.data_name == f"the pretraining images of {root}"
    assert monitor.knn_name == f"the labelled datalist {knn}"
    parser.update({"knn_datalist": None})
    parser.parse()
    assert parser.get_parsed_content("train#knn_data") is None


@pytest.mark.slow
def test_domain_adaptive_pretraining_continues_from_the_official_weights(tmp_path: Path) -> None:
    """The command of docs/pretraining.md ("Continuing from the LVM-Med weights"), at a small size."""
    root, knn = _own_folder_and_knn_datalist(tmp_path)
    released = _fake_lvmmed_resnet(tmp_path / "lvmmed_resnet.torch")
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/pretrain.json",
        "--manifest", str(root), "--pretrained_encoder", str(tmp_path / "lvmmed_resnet.torch"),
        "--learning_rate", "0.0001", "--output_dir", str(tmp_path / "run"),
        "--encoder_export_path", str(tmp_path / "encoder_r50_mine.pt"), "--knn_datalist", str(knn),
        "--image_size", "32", "--batch_size", "16", "--max_epochs", "1", "--num_workers", "0",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="2"), capture_output=True,
                            text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"pretrained encoder of ResNet50Encoder from {tmp_path / 'lvmmed_resnet.torch'}: " in log
    assert "0 missing, 0 unexpected" in log
    assert f"modality MRI (from folder name 'mr')" in log and "modality X-ray (from folder name 'xray')" in log
    assert f"on the pretraining images of {root} (32 images)" in log
    assert f"on the labelled datalist {knn} (8 images, 2 classes)" in log
    assert f"kNN accuracy on the labelled datalist {knn}: " in log and "labelled split" not in log
    exported = torch.load(tmp_path / "encoder_r50_mine.pt", weights_only=True)
    for name in ("conv1.weight", "layer4.2.conv3.weight"):  # trained a little, from the release's values
        change = (exported[name] - released[name]).abs().max()
        assert 0 < change < 0.01, (name, change)
    assert sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")) == before
    assert not list(tmp_path.glob("*.headers.json"))

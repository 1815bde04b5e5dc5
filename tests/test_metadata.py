from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT, SHARED

SCHEMA = SHARED / "monai" / "meta_schema_20240725.json"


def test_metadata_verifies_against_monai_schema_offline() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata",
         "--meta_file", str(REPO_ROOT / "configs" / "metadata.json"), "--filepath", str(SCHEMA)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_metadata_declares_version_in_changelog_and_formats() -> None:
    metadata = json.loads((REPO_ROOT / "configs" / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"]
    assert list(metadata["network_data_format"]["inputs"]) == ["image"]
    assert list(metadata["network_data_format"]["outputs"]) == ["pred"]
    assert {"inputs", "outputs"} <= set(metadata["encoder_data_format"])
    assert {"inputs", "outputs"} <= set(metadata["pretraining_data_format"])
    requirements = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in requirements if "==" in line)
    assert metadata["monai_version"] == pins["monai"]
    assert metadata["pytorch_version"] == pins["torch"]
    for package, version in metadata["required_packages_version"].items():
        assert pins[package] == version, package


def test_network_data_format_describes_the_inference_network_and_its_labels() -> None:
    """verify_net_in_out itself runs in tests/test_seg_workflows.py; here the values that it does not check."""
    from scripts.segmentation.embedded import LABEL_NAMES

    from monai.bundle import ConfigParser

    metadata = json.loads((REPO_ROOT / "configs" / "metadata.json").read_text())
    # inference.json reads its settings from the model's stored settings: the values without a model file
    inference = ConfigParser()
    inference.read_config(str(REPO_ROOT / "configs" / "inference.json"))
    inference["checkpoint"] = str(REPO_ROOT / "models" / "no_such_model.pt")
    image = metadata["network_data_format"]["inputs"]["image"]
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == inference.get_parsed_content("in_channels")
    assert pred["num_channels"] == inference.get_parsed_content("num_classes") == len(pred["channel_def"])
    assert pred["channel_def"] == LABEL_NAMES
    assert pred["format"] == "segmentation"

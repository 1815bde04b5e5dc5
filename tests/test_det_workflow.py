"""train_det.json / inference_det.json: bundle properties, a tiny run from ``python -m monai.bundle``, inference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow

from conftest import REPO_ROOT

TRAIN, INFER = REPO_ROOT / "configs" / "train_det.json", REPO_ROOT / "configs" / "inference_det.json"


def tiny(tmp_path: Path) -> dict:
    return {"output_dir": str(tmp_path / "run"), "dataset_dir": str(tmp_path / "data"),
            "model_path": str(tmp_path / "detector.pt"), "image_size": 32, "training_images": 2,
            "validation_images": 2, "batch_size": 2, "fpn_channels": 8}


def test_train_config_has_the_bundle_properties(tmp_path: Path) -> None:
    workflow = ConfigWorkflow(config_file=str(TRAIN), workflow_type="train", **tiny(tmp_path))
    workflow.initialize()
    assert not workflow.check_properties()


@pytest.mark.slow  # 68-77 s measured on the shared 2-core machine
def test_bundle_run_trains_then_inference_writes_boxes_inside_the_images(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(TRAIN), "--max_epochs", "1",
               "--pretrained_encoder", "None"]
    for key, value in tiny(tmp_path).items():
        command += [f"--{key}", str(value)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="2"), capture_output=True,
                            text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "untrained baseline: val_map50" in log and "after training: val_map50" in log
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["latest"]["val_map50"] <= 1.0

    workflow = ConfigWorkflow(config_file=str(INFER), workflow_type="infer", score_threshold=0.0, **tiny(tmp_path))
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    detections = json.loads((tmp_path / "run" / "detections.json").read_text())
    assert len(detections) == 2 and all(Path(image).is_file() for image in detections)
    boxes = [d for found in detections.values() for d in found]
    assert boxes, "with score_threshold 0 the detector returns boxes"
    for detection in boxes:
        x0, y0, x1, y1 = detection["box"]
        assert detection["label"] == "lesion" and 0.0 <= detection["score"] <= 1.0
        assert -0.01 <= x0 <= x1 <= 32.01 and -0.01 <= y0 <= y1 <= 32.01


def test_inference_names_a_missing_model(tmp_path: Path) -> None:
    workflow = ConfigWorkflow(config_file=str(INFER), workflow_type="infer", **tiny(tmp_path))
    workflow.initialize()
    with pytest.raises(SystemExit) as raised:
        workflow.run()
    assert "detector.pt does not exist" in str(raised.value) and "create it with" in str(raised.value)
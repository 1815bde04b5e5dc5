"""train_cls.json / inference_cls.json: bundle properties, a run from ``python -m monai.bundle``, both encoders."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from conftest import REPO_ROOT
from scripts.networks.classifier import EncoderClassifier
from scripts.networks.resnet_encoder import ResNet50Encoder
from class_images import class_pixels

TRAIN, INFER = REPO_ROOT / "configs" / "train_cls.json", REPO_ROOT / "configs" / "inference_cls.json"
TINY_VIT = {"_target_": "scripts.networks.sam_vit.SamViTEncoder", "img_size": 32, "patch_size": 8, "embed_dim": 16,
            "depth": 2, "num_heads": 2, "out_chans": 8, "window_size": 2, "global_attn_indexes": [1]}


def tiny_datalist(folder: Path, per_class: int = 6) -> Path:
    """Two classes of 32 x 32 images: bright squares and dark horizontal stripes."""
    rng = np.random.default_rng(0)
    splits: dict[str, list] = {"training": [], "validation": []}
    for name in ("squares", "stripes"):
        for number in range(per_class):
            pixels = class_pixels(name, rng)
            path = folder / f"{name}_{number}.png"
            Image.fromarray(pixels).save(path)
            splits["validation" if number < 2 else "training"].append({"image": path.name, "label": name})
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"classes": ["squares", "stripes"], **splits}))
    return datalist


def overrides(tmp_path: Path, datalist: Path) -> dict:
    return {"output_dir": str(tmp_path / "run"), "dataset_dir": str(tmp_path), "datalist": str(datalist),
            "model_path": str(tmp_path / "classifier.pt"), "image_size": 32, "batch_size": 4, "pretrained_encoder": None}


@pytest.mark.parametrize("config, kind", [(TRAIN, "train"), (INFER, "infer")])
def test_configs_have_the_bundle_properties(tmp_path: Path, config: Path, kind: str) -> None:
    if kind == "infer":  # inference needs a trained model: any classifier of the right layout
        torch.save(EncoderClassifier(ResNet50Encoder(), num_classes=2).state_dict(), tmp_path / "classifier.pt")
    settings = overrides(tmp_path, tiny_datalist(tmp_path))
    if kind == "infer":  # an unknown key stops a run (scripts.config_checks)
        del settings["pretrained_encoder"]
    workflow = ConfigWorkflow(config_file=str(config), workflow_type=kind, **settings)
    workflow.initialize()
    assert not workflow.check_properties()


@pytest.mark.slow  # 68-77 s measured on the shared 2-core machine
def test_bundle_run_trains_a_linear_probe_then_inference_writes_probabilities(tmp_path: Path) -> None:
    datalist = tiny_datalist(tmp_path)
    settings = overrides(tmp_path, datalist)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(TRAIN), "--max_epochs", "1",
               "--encoder", json.dumps(TINY_VIT)]
    for key, value in settings.items():
        command += [f"--{key}", "None" if value is None else str(value)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="2"), capture_output=True,
                            text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "untrained baseline: val_accuracy" in log and "val_squares_recall" in log
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["baseline"]) == {"val_accuracy", "val_auc"} and set(metrics["latest"]) == {"val_accuracy", "val_auc"}

    workflow = ConfigWorkflow(config_file=str(INFER), workflow_type="infer", encoder=TINY_VIT,
                              **{k: v for k, v in settings.items() if k != "pretrained_encoder"})
    workflow.initialize()
    workflow.run()
    rows = list(csv.DictReader((tmp_path / "run" / "class_probabilities.csv").open()))
    assert len(rows) == 4 and list(rows[0]) == ["image", "prediction", "p_squares", "p_stripes"]
    for row in rows:
        probabilities = [float(row["p_squares"]), float(row["p_stripes"])]
        assert abs(sum(probabilities) - 1) < 1e-4
        assert row["prediction"] == ("squares", "stripes")[int(np.argmax(probabilities))]


def test_vit_encoder_fine_tuning_with_two_layer_head(tmp_path: Path) -> None:
    settings = overrides(tmp_path, tiny_datalist(tmp_path))
    workflow = ConfigWorkflow(config_file=str(TRAIN), workflow_type="train", encoder=TINY_VIT, linear_probe=False,
                              head_hidden_features=[16, 8], max_epochs=1, **settings)
    workflow.initialize()
    workflow.run()
    network = workflow.network_def
    assert network.encoder.patch_embed.proj.weight.requires_grad and not network.freeze_encoder
    assert (tmp_path / "classifier.pt").is_file()
    infer = ConfigWorkflow(config_file=str(INFER), workflow_type="infer", encoder=TINY_VIT, head_hidden_features=[16, 8],
                           input_dir=str(tmp_path),
                           **{k: v for k, v in settings.items() if k != "pretrained_encoder"})
    infer.initialize()
    infer.run()
    rows = list(csv.DictReader((tmp_path / "run" / "class_probabilities.csv").open()))
    assert len(rows) == 12  # every image of the folder


@pytest.mark.slow
def test_linear_probe_on_embedded_data_beats_the_untrained_baseline(tmp_path: Path) -> None:
    workflow = ConfigWorkflow(config_file=str(TRAIN), workflow_type="train", output_dir=str(tmp_path / "run"),
                              dataset_dir=str(tmp_path / "data"), model_path=str(tmp_path / "classifier.pt"),
                              pretrained_encoder=None, max_epochs=3)
    workflow.initialize()
    workflow.run()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["latest"]["val_accuracy"] > metrics["baseline"]["val_accuracy"] + 0.2

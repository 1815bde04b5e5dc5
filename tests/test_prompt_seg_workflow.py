"""The box-prompted segmentation bundle configs: properties, MedSAM-style training (frozen encoders) and inference."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from conftest import REPO_ROOT

TRAIN_CONFIG = REPO_ROOT / "configs" / "train_prompt_seg.json"
INFER_CONFIG = REPO_ROOT / "configs" / "inference_prompt_seg.json"
TINY = {"image_size": 64, "encoder_image_size": 64, "encoder#embed_dim": 64, "encoder#depth": 2,
        "encoder#num_heads": 2, "encoder#window_size": 4, "encoder#global_attn_indexes": [1]}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny networks run faster on one thread than on two shared ones
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict:
    """One epoch of the train config in-process, with the frozen parts' state before and after."""
    root = tmp_path_factory.mktemp("prompt_seg")
    workflow = ConfigWorkflow(
        config_file=str(TRAIN_CONFIG), workflow_type="train", bundle_root=str(REPO_ROOT),
        output_dir=str(root / "run"), dataset_dir=str(root / "data"), model_export_path=str(root / "model.pt"),
        max_epochs=1, batch_size=16, **TINY,
    )
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network")
    before = {k: v.clone() for k, v in network.state_dict().items()}
    workflow.run()
    workflow.finalize()
    return {"root": root, "before": before, "after": network.state_dict()}


@pytest.mark.parametrize(("config", "workflow_type"), [(TRAIN_CONFIG, "train"), (INFER_CONFIG, "infer")])
def test_configs_have_the_bundle_properties(config: Path, workflow_type: str, trained: dict) -> None:
    root = trained["root"]
    workflow = ConfigWorkflow(
        config_file=str(config), workflow_type=workflow_type, bundle_root=str(REPO_ROOT), output_dir=str(root / "check"),
        dataset_dir=str(root / "data" / "test" / "images" if workflow_type == "infer" else root / "data"),
        # each config's own weights key (an unknown key stops a run: scripts.config_checks)
        **({"model_path": str(root / "model.pt")} if workflow_type == "infer" else
           {"model_export_path": str(root / "check" / "model.pt")}), **TINY,
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_training_changes_only_the_mask_decoder_and_reports_the_baseline(trained: dict) -> None:
    before, after = trained["before"], trained["after"]
    frozen = [k for k in before if k.startswith(("image_encoder.", "prompt_encoder."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    decoder = [k for k in before if k.startswith("mask_decoder.")]
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
    summary = json.loads((trained["root"] / "run" / "dice_untrained_vs_trained.json").read_text())
    assert len(summary["history"]) == 2 and 0.0 <= summary["untrained"] <= 1.0 and 0.0 <= summary["trained"] <= 1.0
    exported = torch.load(trained["root"] / "model.pt", weights_only=True)
    assert {k.split(".")[0] for k in exported} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert torch.equal(exported["mask_decoder.iou_token.weight"], after["mask_decoder.iou_token.weight"])


def test_inference_writes_one_mask_per_image_at_original_size(trained: dict, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (48, 80), dtype=np.uint8)).save(images / "grey.png")
    Image.fromarray(rng.randint(0, 255, (70, 40, 3), dtype=np.uint8)).save(images / "colour.png")
    (images / "boxes.csv").write_text(
        "image,x_min,y_min,x_max,y_max\ngrey.png,5,5,40,30\ngrey.png,50,10,79,47\ncolour.png,0,0,39,69\n"
    )
    workflow = ConfigWorkflow(
        config_file=str(INFER_CONFIG), workflow_type="infer", bundle_root=str(REPO_ROOT),
        dataset_dir=str(images), output_dir=str(tmp_path / "masks"), model_path=str(trained["root"] / "model.pt"), **TINY,
    )
    workflow.initialize()
    workflow.run()
    grey, colour = (np.asarray(Image.open(tmp_path / "masks" / f"{n}_mask.png")) for n in ("grey", "colour"))
    assert grey.shape == (48, 80) and colour.shape == (70, 40)
    assert set(np.unique(grey)) <= {0, 1, 2} and set(np.unique(colour)) <= {0, 1}


def test_inference_rejects_a_box_outside_its_image(trained: dict, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "scan.png")
    (tmp_path / "boxes.json").write_text(json.dumps({"scan.png": [0, 0, 40, 10]}))
    workflow = ConfigWorkflow(
        config_file=str(INFER_CONFIG), workflow_type="infer", bundle_root=str(REPO_ROOT), dataset_dir=str(tmp_path),
        output_dir=str(tmp_path / "masks"), model_path=str(trained["root"] / "model.pt"), **TINY,
    )
    workflow.initialize()
    with pytest.raises(Exception) as raised:  # MONAI and Ignite wrap it; the cause is kept in the chain
        workflow.run()
    chain, error = [], raised.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any(re.search(r"scan.png: box .* lies outside the image of 32 rows x 32 columns", m) for m in chain), chain


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.slow
def test_bundle_training_beats_the_untrained_baseline_and_inference_segments_the_test_set(tmp_path: Path) -> None:
    tiny = ["--image_size", "128", "--encoder_image_size", "128", "--encoder#embed_dim", "64", "--encoder#depth", "2",
            "--encoder#num_heads", "2", "--encoder#window_size", "4", "--encoder#global_attn_indexes", "[1]"]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    train = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(TRAIN_CONFIG), "--output_dir",
         str(tmp_path / "run"), "--dataset_dir", str(tmp_path / "data"), "--model_export_path", str(tmp_path / "m.pt"),
         "--max_epochs", "15", *tiny],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=900,
    )
    log = train.stdout + train.stderr
    assert train.returncode == 0, log[-4000:]
    untrained, trained = map(float, re.search(r"untrained baseline ([\d.]+) -> trained ([\d.]+)", log).groups())
    print(f"validation Dice: untrained {untrained:.4f}, trained {trained:.4f}")
    assert trained > untrained + 0.2

    test_dir = tmp_path / "data" / "test"
    infer = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFER_CONFIG), "--dataset_dir",
         str(test_dir / "images"), "--output_dir", str(tmp_path / "masks"), "--model_path", str(tmp_path / "m.pt"), *tiny],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert infer.returncode == 0, (infer.stdout + infer.stderr)[-4000:]
    scores = [
        _dice(np.asarray(Image.open(tmp_path / "masks" / f"{label.stem}_mask.png")) > 0, np.asarray(Image.open(label)) > 0)
        for label in sorted((test_dir / "labels").glob("*.png"))
    ]
    assert len(scores) == 8 and np.mean(scores) > 0.4

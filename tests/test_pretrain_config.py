"""The pretraining bundle config, run as a user runs it: ``python -m monai.bundle run``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import REPO_ROOT
from scripts.handlers.checkpoint import latest_checkpoint
from scripts.networks.resnet_encoder import ResNet50Encoder

SAMPLES = 304  # embedded data, see scripts/data/embedded.py
LARGEST_MODALITY = 90  # MRI slices of the embedded data
MODALITIES = 5


def bundle_command(tmp_path: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/pretrain.json",
        "--output_dir", str(tmp_path / "run"), "--data_root", str(tmp_path / "data"),
        "--encoder_export_path", str(tmp_path / "encoder.pt"),
        "--image_size", "32", "--batch_size", "32", "--max_epochs", "1", "--monitor_interval", "1",
        "--balance_modalities", "False", *overrides,
    ]


def run_bundle(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run(bundle_command(tmp_path, *overrides), cwd=REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=900)


def test_pretrain_config_trains_logs_checkpoints_and_exports(tmp_path: Path) -> None:
    result = run_bundle(tmp_path, "--checkpoint_interval", "4")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    iterations = SAMPLES // 32
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == f"checkpoint_{iterations}.pt"
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
    exported = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert "layer4.2.conv3.weight" in exported and not any(key.startswith("fc.") for key in exported)
    for figure in ("knn_accuracy_at_start", "knn_accuracy", "match_accuracy", "imle_nonzero_share", "effective_rank"):
        assert figure in log


@pytest.fixture(scope="module")
def embedded_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded")


@pytest.mark.parametrize("balance", [True, False])
def test_modality_balancing_is_one_switch(embedded_root: Path, balance: bool) -> None:
    parser = ConfigParser()
    parser.read_config(REPO_ROOT / "configs" / "pretrain.json")
    parser.update({"bundle_root": str(REPO_ROOT), "data_root": str(embedded_root), "balance_modalities": balance,
                   "image_size": 32, "augmentation": "per_sample", "cache_rate": 0.0})  # views made by the dataset
    dataset = parser.get_parsed_content("train#dataset")
    counts = Counter(dataset.modalities) if balance else Counter(parser.get_parsed_content("train#slices").modalities)
    if balance:
        assert len(dataset) == LARGEST_MODALITY * MODALITIES
        assert set(counts.values()) == {LARGEST_MODALITY}
    else:
        assert len(dataset) == SAMPLES
        assert len(set(counts.values())) > 1
    sample = dataset[len(dataset) - 1]
    assert sample["view1"].shape == sample["view2"].shape == (3, 32, 32)


def test_a_switch_given_as_a_string_is_refused(embedded_root: Path) -> None:
    parser = ConfigParser()
    parser.read_config(REPO_ROOT / "configs" / "pretrain.json")
    parser.update({"bundle_root": str(REPO_ROOT), "data_root": str(embedded_root), "balance_modalities": "false"})
    with pytest.raises(RuntimeError) as error:
        parser.get_parsed_content("train#dataset")
    assert "balance_modalities must be True or False, got 'false'" in str(error.value.__cause__)


def test_encoder_starts_from_pretrained_encoder(tmp_path: Path) -> None:
    """The paper starts ResNet-50 from ImageNet weights: a torchvision-layout file (with ``fc``) is loaded."""
    source = ResNet50Encoder()
    state = {**source.state_dict(), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "resnet50_imagenet.pth")
    parser = ConfigParser()
    parser.read_config(REPO_ROOT / "configs" / "pretrain.json")
    parser.update({"bundle_root": str(REPO_ROOT), "pretrained_encoder": str(tmp_path / "resnet50_imagenet.pth")})
    encoder = parser.get_parsed_content("network_def").encoder
    for name, value in source.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], value), name


def test_each_ablation_is_one_override(tmp_path: Path) -> None:
    overrides = ["--loss#second_order", "False", "--loss#message_passing", "False", "--loss#noise", "none",
                 "--loss#local_similarity", "False", "--max_epochs", "1", "--monitor_interval", "0"]
    result = run_bundle(tmp_path, *overrides)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    command = bundle_command(tmp_path, "--checkpoint_interval", "3", "--max_epochs", "2", "--monitor_interval", "0")
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 600
    while latest_checkpoint(checkpoints) is None or latest_checkpoint(checkpoints).name == "checkpoint_3.pt":
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before two checkpoints"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = int(latest_checkpoint(checkpoints).stem.split("_")[1])
    assert killed_at < 2 * (SAMPLES // 32)

    result = run_bundle(tmp_path, "--checkpoint_interval", "3", "--max_epochs", "2", "--monitor_interval", "0")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"resumed from {checkpoints / f'checkpoint_{killed_at}.pt'} at iteration {killed_at}" in log
    final = torch.load(latest_checkpoint(checkpoints), weights_only=True)
    assert final["trainer"]["iteration"] == 2 * (SAMPLES // 32)
    assert final["optimizer"]["state"][0]["step"] == 2 * (SAMPLES // 32)

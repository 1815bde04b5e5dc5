"""The pretraining bundle config, run as a user runs it: ``python -m monai.bundle run``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from scripts.handlers.checkpoint import latest_checkpoint

SAMPLES = 304  # embedded data, see scripts/data/embedded.py


def bundle_command(tmp_path: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/pretrain.json",
        "--output_dir", str(tmp_path / "run"), "--data_root", str(tmp_path / "data"),
        "--encoder_export_path", str(tmp_path / "encoder.pt"),
        "--image_size", "32", "--batch_size", "32", "--max_epochs", "1", "--monitor_interval", "1", *overrides,
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


def test_each_ablation_is_one_override(tmp_path: Path) -> None:
    overrides = ["--loss#second_order", "false", "--loss#message_passing", "false", "--loss#noise", "none",
                 "--loss#local_similarity", "false", "--max_epochs", "1", "--monitor_interval", "None"]
    result = run_bundle(tmp_path, *overrides)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    command = bundle_command(tmp_path, "--checkpoint_interval", "3", "--max_epochs", "2", "--monitor_interval", "None")
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

    result = run_bundle(tmp_path, "--checkpoint_interval", "3", "--max_epochs", "2", "--monitor_interval", "None")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"resumed from {checkpoints / f'checkpoint_{killed_at}.pt'} at iteration {killed_at}" in log
    final = torch.load(latest_checkpoint(checkpoints), weights_only=True)
    assert final["trainer"]["iteration"] == 2 * (SAMPLES // 32)
    assert final["optimizer"]["state"][0]["step"] == 2 * (SAMPLES // 32)

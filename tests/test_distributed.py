from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(Path(__file__).parent))
from ddp_gradients import build_model, fixed_batch, gradients  # noqa: E402


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)


def test_two_process_ddp_gradients_equal_single_process(tmp_path: Path) -> None:
    """Graphs are built per rank: with the batch split so that each rank holds whole graphs, the DDP
    average of the ranks' gradients equals one process's gradient on the whole batch."""
    output = tmp_path / "ddp.pt"
    result = torchrun(2, str(REPO_ROOT / "tests" / "ddp_gradients.py"), str(output))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    distributed = torch.load(output, weights_only=True)

    model = build_model()
    model(*fixed_batch()).backward()
    single = gradients(model)
    assert set(distributed) == set(single)
    assert any(grad.abs().sum() > 0 for grad in single.values())
    for name, grad in single.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow  # about 40 s on 2 cores; make test keeps the two-process DDP gradient check above
def test_multi_gpu_bundle_config_runs_under_torchrun_with_gloo(tmp_path: Path) -> None:
    configs = "['configs/pretrain.json','configs/multi_gpu_pretrain.json']"
    result = torchrun(
        2, "-m", "monai.bundle", "run", "--config_file", configs, "--image_size", "32", "--batch_size", "16",
        "--max_epochs", "1", "--output_dir", str(tmp_path / "run"), "--data_root", str(tmp_path / "data"),
        "--encoder_export_path", str(tmp_path / "encoder.pt"), "--monitor_interval", "0",
        "--balance_modalities", "False",
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    # 304 embedded samples, 2 ranks of batch 16: 9 iterations per rank, one checkpoint written by rank 0
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["checkpoint_9.pt"]
    assert log.count("Engine run finished") == 2
    assert (tmp_path / "encoder.pt").exists()

"""Distributed faults on 127.0.0.1 with gloo on CPU: a worker killed mid-epoch under torchrun's elastic restart,
and a run over two "nodes" (two torchrun launchers meeting at a c10d rendezvous on loopback)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from scripts.handlers.checkpoint import latest_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from ddp_gradients import build_model, fixed_batch, gradients  # noqa: E402

pytestmark = pytest.mark.slow
SAMPLES = 304  # embedded data
CONFIGS = ["configs/pretrain.json", "configs/multi_gpu_pretrain.json"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")


def pretrain_args(tmp_path: Path, configs: list[str], *extra: str) -> list[str]:
    return ["-m", "monai.bundle", "run", "--config_file", "[" + ",".join(f"'{c}'" for c in configs) + "]",
            "--image_size", "32", "--batch_size", "16", "--output_dir", str(tmp_path / "run"),
            "--data_root", str(tmp_path / "data"), "--encoder_export_path", str(tmp_path / "encoder.pt"),
            "--monitor_interval", "0", "--balance_modalities", "False", *extra]


def test_a_worker_killed_mid_epoch_restarts_from_the_last_checkpoint_and_finishes(tmp_path: Path) -> None:
    # rank 1 kills itself with SIGKILL after iteration 5 of the first attempt (torchrun counts attempts in
    # TORCHELASTIC_RESTART_COUNT); checkpoints every 3 iterations: the restart must resume from checkpoint_3.pt
    fault = tmp_path / "kill_rank1.json"
    fault.write_text(json.dumps({"run": [
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once=5), lambda engine: "
        "os.kill(os.getpid(), 9)) if dist.get_rank() == 1 and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0' "
        "else None",
        "$@train#trainer.run()",
    ]}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", "1", "--monitor-interval", "1",
               *pretrain_args(tmp_path, [*CONFIGS, str(fault)], "--max_epochs", "2", "--checkpoint_interval", "3")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment(), capture_output=True, text=True, timeout=1500)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    planned = 2 * (SAMPLES // (2 * 16))  # 2 epochs of 9 iterations per rank
    assert re.search(r"SIGKILL|Signals\.SIGKILL|exitcode\s*:\s*-9", log), log[-5000:]
    assert log.count("resumed from") == 2 and "checkpoint_3.pt at iteration 3" in log  # both ranks, restarted
    final = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert final.name == f"checkpoint_{planned}.pt"
    assert torch.load(final, weights_only=True)["trainer"]["iteration"] == planned
    assert (tmp_path / "encoder.pt").exists()


def two_nodes(tmp_path: Path, *args: str, timeout: int) -> list[subprocess.CompletedProcess]:
    """Two launchers, one process each, meeting at a c10d rendezvous on 127.0.0.1 (as two machines would)."""
    endpoint = f"127.0.0.1:{free_port()}"
    launchers = []
    for node, is_host in enumerate((1, 0)):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", f"faults-{tmp_path.name}",
                   "--rdzv_conf", f"is_host={is_host}", "--local-addr", "127.0.0.1", *args]
        launchers.append(subprocess.Popen(command, cwd=REPO_ROOT, env=environment(), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    results = []
    for launcher in launchers:
        output, _ = launcher.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(launcher.args, launcher.returncode, output, ""))
    return results


def test_two_nodes_give_the_gradients_of_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    output = tmp_path / "ddp.pt"
    results = two_nodes(tmp_path, str(REPO_ROOT / "tests" / "ddp_gradients.py"), str(output), timeout=600)
    assert all(r.returncode == 0 for r in results), "\n".join(r.stdout[-3000:] for r in results)
    distributed = torch.load(output, weights_only=True)
    model = build_model()
    model(*fixed_batch()).backward()
    single = gradients(model)
    assert set(distributed) == set(single)
    for name, grad in single.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_two_nodes_finish_pretraining(tmp_path: Path) -> None:
    results = two_nodes(tmp_path, *pretrain_args(tmp_path, CONFIGS, "--max_epochs", "1"), timeout=1200)
    log = "\n".join(r.stdout for r in results)
    assert all(r.returncode == 0 for r in results), log[-5000:]
    assert log.count("Engine run finished") == 2
    iterations = SAMPLES // (2 * 16)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [f"checkpoint_{iterations}.pt"]
    assert (tmp_path / "encoder.pt").exists()

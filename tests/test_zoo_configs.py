"""Every config against MONAI's bundle properties for its workflow type, inference configs without their weights, and
MONAI Label's ``CheckpointLoader`` kept on every rank of the multi-GPU segmentation training."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from monai.bundle import ConfigParser, ConfigWorkflow

from conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
# the weights each inference config reads, by config id
WEIGHTS_ID = {"inference.json": "checkpoint", "inference_trt.json": "checkpoint", "evaluate.json": "checkpoint"}
# overlays other than multi_gpu_<base>.json, with the config they extend
OVERLAYS = {"pretrain_vit.json": "pretrain.json", "inference_trt.json": "inference.json"}
# building SAM ViT-B at 1024 pixels (and the prompt-segmentation data) takes minutes on CPU
SLOW = {"train_prompt_seg.json", "inference_prompt_seg.json", "pretrain_vit.json"}


def _config_files(name: str) -> list[str]:
    """A config, or an overlay (``multi_gpu_*``, :data:`OVERLAYS`) after the config it extends."""
    if name.startswith("multi_gpu_"):
        return [str(CONFIGS / name.removeprefix("multi_gpu_")), str(CONFIGS / name)]
    if name in OVERLAYS:
        return [str(CONFIGS / OVERLAYS[name]), str(CONFIGS / name)]
    return [str(CONFIGS / name)]


def _workflow_type(name: str) -> str:
    return "train" if "train" in name else "infer"


def _all_configs() -> list:
    names = sorted(p.name for p in CONFIGS.glob("*.json") if p.name != "metadata.json")
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in names]


def _inference_configs() -> list:
    names = sorted(p.name for p in CONFIGS.glob("inference*.json")) + ["evaluate.json"]
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in names]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def single_process_group(monkeypatch):
    """The environment torchrun would give one process, for the ``multi_gpu_*`` overlays' ``init_process_group``."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("name", _all_configs())
def test_every_config_has_the_properties_of_its_workflow_type(name, single_process_group):
    workflow = ConfigWorkflow(
        config_file=_config_files(name), meta_file=str(CONFIGS / "metadata.json"), workflow_type=_workflow_type(name),
        bundle_root=str(REPO_ROOT),
    )  # no weights file is read until the run (tests/test_properties_without_weights.py)
    workflow.initialize()
    assert workflow.check_properties() == []


@pytest.mark.parametrize("name", _inference_configs())
def test_inference_configs_without_weights_initialise_then_stop_naming_the_command(name, tmp_path):
    missing = tmp_path / "absent.pt"
    workflow = ConfigWorkflow(
        config_file=_config_files(name), meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="eval" if name == "evaluate.json" else "infer",
        bundle_root=str(REPO_ROOT), **{WEIGHTS_ID.get(name, "model_path"): str(missing)},
    )
    workflow.initialize()  # what MONAI's checks and MONAI Label do with a bundle that has no weights yet
    with pytest.raises(SystemExit, match=rf"{missing}.*create it with: (make model|python -m monai\.bundle run)"):
        workflow.run()


def test_monai_bundle_run_without_weights_prints_the_command_without_a_traceback(tmp_path):
    missing = tmp_path / "model.pt"
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--checkpoint",
         str(missing)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 1
    assert f"error: the weights file {missing} does not exist; create it with: make model" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_multi_gpu_training_keeps_monai_labels_checkpoint_loader_on_every_rank(tmp_path):
    """As MONAI Label's ``BundleTrainTask`` does for a multi-GPU request: a ``CheckpointLoader`` of the served
    weights inserted first in ``train#handlers``, the config exported and run with ``multi_gpu_train.json`` under
    torchrun. Each rank must load those weights (DDP averages gradients, it does not align diverging weights)."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    start = tmp_path / "served.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), start)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["train"]["handlers"].insert(
        0, {"_target_": "CheckpointLoader", "load_path": str(start), "load_dict": {"model": "$@network"}, "strict": False}
    )
    exported = tmp_path / "monailabel_train.json"
    ConfigParser.export_config_file(parser.config, str(exported), indent=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
         "run", "--config_file", f"['{exported}','{CONFIGS / 'multi_gpu_train.json'}']", "--meta_file",
         str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"), "--max_epochs", "1",
         "--val_interval", "5", "--output_dir", str(tmp_path / "run"), "--best_model_path", str(tmp_path / "model.pt"),
         "--resume", "False"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert log.count(f"Restored all variables from {start}") == 2, log[-4000:]
    assert (tmp_path / "model.pt").is_file()  # no validation ran: the last network is the model

"""A real MONAI Label server serving this bundle, installed from its zoo archive, in MONAI Label's own environment.

The environment (``.venv-monailabel/``, about 7.5 GB) is created on first use by
``bundle.monailabel.environment.ensure_monailabel_venv`` and reused afterwards. The served mask must equal the mask
the bundle's own ``configs/inference.json`` writes for the same image and weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle.monailabel.environment import ensure_monailabel_venv
from bundle.package import build_package
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

MODEL = "lvm_med"
STARTUP_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _last_conv(network: torch.nn.Module, out_channels: int) -> torch.nn.Conv2d:
    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == out_channels]
    assert convs, "the segmentation network has no output convolution"
    return convs[-1]


def _write_weights(bundle: Path, image: Path) -> None:
    """``models/model.pt`` for the installed bundle: the initialised network whose output bias is centred on this
    image's mean logits, so that the mask holds several classes (a fresh network predicts one class everywhere)."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def").eval()
    volume = parser.get_parsed_content("preprocessing")({"image": str(image)})["image"]  # (C, H, W, D)
    middle = volume[..., volume.shape[-1] // 2].unsqueeze(0)
    with torch.no_grad():
        logits = network(middle.as_tensor() if hasattr(middle, "as_tensor") else middle)
        head = _last_conv(network, logits.shape[1])
        head.bias -= logits.mean(dim=(0, 2, 3))
    torch.save(network.state_dict(), bundle / "models" / "model.pt")


def _read_mask(payload: bytes, folder: Path) -> nib.Nifti1Image:
    path = folder / ("served.nii.gz" if payload[:2] == b"\x1f\x8b" else "served.nii")
    path.write_bytes(payload)
    return nib.load(path)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The MONAI Label app with this bundle installed from its zoo archive by MONAI (in MONAI Label's environment),
    a study folder holding a real MRI volume (nibabel's ``anatomical.nii``), and weights for it."""
    python = ensure_monailabel_venv()
    root = tmp_path_factory.mktemp("monailabel")
    archive = build_package(REPO_ROOT, root / "dist", allow_unhashed=True).path
    app = root / "app"
    shutil.copytree(REPO_ROOT / "bundle" / "monailabel" / "app", app, ignore=shutil.ignore_patterns("model", "__pycache__"))
    subprocess.run(
        [str(python), "-m", "monai.bundle", "download", "--name", MODEL, "--url", archive.as_uri(),
         "--bundle_dir", str(app / "model"), "--progress", "False"],
        check=True, capture_output=True, timeout=600,
    )
    bundle = app / "model" / MODEL
    studies = root / "studies"
    studies.mkdir()
    image = studies / "anatomical.nii"
    shutil.copy(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii", image)
    _write_weights(bundle, image)
    return {"python": python, "app": app, "bundle": bundle, "studies": studies, "image": image, "root": root}


@pytest.fixture(scope="module")
def server(installed: dict[str, Path]):
    """``monailabel start_server`` on a free port of 127.0.0.1; stopped (its process group) at the end."""
    port = _free_port()
    log_path = installed["root"] / "server.log"
    command = [str(installed["python"]), "-m", "monailabel.main", "start_server", "--app", str(installed["app"]),
               "--studies", str(installed["studies"]), "--conf", "models", MODEL, "--host", "127.0.0.1",
               "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=installed["root"])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"MONAI Label server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/info/", timeout=10) as response:
                    info = json.load(response)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"MONAI Label server not up after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
                time.sleep(2)
        yield {"url": url, "info": info, "log": log_path}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_server_lists_the_bundle_with_the_metadata_labels(installed, server):
    metadata = json.loads((installed["bundle"] / "configs" / "metadata.json").read_text())
    channel_def = next(iter(metadata["network_data_format"]["outputs"].values()))["channel_def"]
    expected = {name.lower(): int(index) for index, name in channel_def.items() if name.lower() != "background"}
    model = server["info"]["models"][MODEL]
    assert model["type"] == "segmentation"
    assert model["labels"] == expected
    assert model["version"] == metadata["version"]
    assert MODEL in server["info"]["trainers"]  # BundleTrainTask accepted configs/train.json


def test_served_mask_equals_the_bundle_inference_workflow(installed, server, tmp_path):
    request = urllib.request.Request(f"{server['url']}/infer/{MODEL}?image=anatomical&output=image", method="POST")
    with urllib.request.urlopen(request, timeout=900) as response:
        assert response.status == 200
        served = _read_mask(response.read(), tmp_path)

    source = nib.load(installed["image"])
    mask = np.asarray(served.dataobj)
    assert mask.shape == source.shape
    np.testing.assert_allclose(served.affine, source.affine, atol=1e-4)
    labels = set(np.unique(mask).astype(int).tolist())
    assert labels <= {0, *server["info"]["models"][MODEL]["labels"].values()}
    assert len(labels) >= 2, f"a one-class mask checks little: {labels}"

    # the same image through the installed bundle's own inference workflow, run from its folder
    inputs, out = tmp_path / "inputs", tmp_path / "local"
    inputs.mkdir()
    shutil.copy(installed["image"], inputs)  # the study folder also holds the server's datastore files
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--dataset_dir", str(inputs), "--output_dir", str(out)],
        cwd=installed["bundle"], capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    local = np.asarray(nib.load(out / "anatomical_seg.nii.gz").dataobj)
    agreement = float(np.mean(local == mask))
    assert agreement > 0.99, f"served and local masks agree on {agreement:.3%} of voxels"

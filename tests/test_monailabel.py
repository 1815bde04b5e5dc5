"""A real MONAI Label server serving this bundle, installed from its zoo archive, in MONAI Label's own environment.

The environment (``.venv-monailabel/``, about 7.5 GB) is created on first use by
``bundle.monailabel.environment.ensure_monailabel_venv`` and reused afterwards. The server is started as
``bundle/README.md`` documents it (``.venv-monailabel/bin/python -m monailabel.main start_server ...``). Checked: the
served mask of a NIfTI volume equals the mask the bundle's own ``configs/inference.json`` writes for the same image
and weights; a 2D PNG comes back as an (H, W) mask; serving and training write nothing into the served bundle folder
but ``models/model.pt``; two train requests with two labelled images (no validation split) each run their epochs
from ``models/model.pt`` and update it; checkpoints stay bounded, outside the bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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

from PIL import Image

from bundle.monailabel.app_folder import make_app_folder
from bundle.monailabel.environment import ensure_monailabel_venv
from bundle.package import build_package
from scripts.segmentation.embedded import prepare_segmentation_data
from zoo_staging import staged_bundle

pytestmark = pytest.mark.slow

MODEL = "lvm_med"
STARTUP_TIMEOUT_S = 600
LABELLED = ("case_000", "case_001")  # embedded 2D cases given to the datastore with their labels
TRAIN_EPOCHS = 2


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


def _read_any_mask(payload: bytes, folder: Path) -> np.ndarray:
    """A served mask as an array, whatever format MONAI Label chose (PNG, NIfTI, gzipped NIfTI)."""
    if payload[:8] == b"\x89PNG\r\n\x1a\n":
        path = folder / "served.png"
        path.write_bytes(payload)
        return np.asarray(Image.open(path))
    return np.asarray(_read_mask(payload, folder).dataobj)


def _files_under(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (byte-code caches aside) with its sha256."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def _post(server: dict, path: str, body: dict | None = None, timeout: float = 1800) -> tuple[int, bytes]:
    """POSTs to the server; an HTTP error fails the test with the end of the server's log."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{server['url']}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        pytest.fail(f"POST {path}: HTTP {error.code}\n{server['log'].read_text(errors='replace')[-6000:]}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The MONAI Label app with this bundle installed from its zoo archive by MONAI (in MONAI Label's environment),
    a study folder holding a real MRI volume (nibabel's ``anatomical.nii``), and weights for it."""
    python = ensure_monailabel_venv()
    root = tmp_path_factory.mktemp("monailabel")
    archive = build_package(staged_bundle(root / "source"), root / "dist").path
    app = make_app_folder(root / "app")  # as bundle/README.md documents: outside the repository
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
    cases = Path(prepare_segmentation_data(root / "embedded"))
    (studies / "labels" / "final").mkdir(parents=True)
    for case in LABELLED:
        shutil.copy(cases / "imagesTr" / f"{case}.png", studies / f"{case}.png")
        shutil.copy(cases / "labelsTr" / f"{case}.png", studies / "labels" / "final" / f"{case}.png")
    _write_weights(bundle, image)
    return {"python": python, "app": app, "bundle": bundle, "studies": studies, "image": image, "root": root,
            "bundle_files": _files_under(bundle)}


@pytest.fixture(scope="module")
def server(installed: dict[str, Path]):
    """``monailabel start_server`` on a free port of 127.0.0.1; stopped (its process group) at the end."""
    port = _free_port()
    log_path = installed["root"] / "server.log"
    # as bundle/README.md documents it: the environment's interpreter, without activating the environment
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
    assert model["dimension"] == 3  # volumes are segmented slice by slice: 3D viewers offer the model for them
    assert MODEL in server["info"]["trainers"]  # BundleTrainTask accepted configs/train.json


def test_the_documented_curl_output_opens_with_nibabel(installed, server, tmp_path):
    """bundle/README.md's ``curl ... -o NAME``: the server answers uncompressed NIfTI, so NAME must not end in .gz."""
    readme = (Path(__file__).resolve().parents[1] / "bundle" / "README.md").read_text()
    name = re.search(r'curl -X POST "[^"]*/infer/lvm_med[^"]*" -o (\S+)', readme).group(1)
    status, payload = _post(server, f"/infer/{MODEL}?image=anatomical&output=image")
    assert status == 200
    (tmp_path / name).write_bytes(payload)
    assert nib.load(tmp_path / name).shape == nib.load(installed["image"]).shape


def test_served_mask_equals_the_bundle_inference_workflow(installed, server, tmp_path):
    status, payload = _post(server, f"/infer/{MODEL}?image=anatomical&output=image")
    assert status == 200
    served = _read_mask(payload, tmp_path)

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


def test_a_png_comes_back_as_a_mask_of_its_shape(installed, server, tmp_path):
    status, payload = _post(server, f"/infer/{MODEL}?image={LABELLED[0]}&output=image")
    assert status == 200
    mask = _read_any_mask(payload, tmp_path)
    source = np.asarray(Image.open(installed["studies"] / f"{LABELLED[0]}.png"))
    assert mask.shape == source.shape[:2]
    assert set(np.unique(mask).astype(int).tolist()) <= {0, *server["info"]["models"][MODEL]["labels"].values()}


def test_training_twice_runs_its_epochs_from_the_served_weights_and_updates_them(installed, server):
    weights = installed["bundle"] / "models" / "model.pt"
    digests = [hashlib.sha256(weights.read_bytes()).hexdigest()]
    log_before = server["log"].read_text(errors="replace")
    # two labelled images and MONAI Label's default 0.2 validation split: no validation image
    request = {"max_epochs": TRAIN_EPOCHS, "device": "cpu", "multi_gpu": False, "val_split": 0.2}
    for _ in range(2):
        status, _ = _post(server, f"/train/{MODEL}?run_sync=true", request)
        assert status == 200
        digests.append(hashlib.sha256(weights.read_bytes()).hexdigest())
    assert len(set(digests)) == 3, "each train request must write new weights to models/model.pt"
    log = server["log"].read_text(errors="replace")[len(log_before):]
    assert log.count(f"Restored all variables from {weights}") == 2, log[-4000:]
    assert log.count(f"Epoch[{TRAIN_EPOCHS}] Complete") >= 2, log[-4000:]

    runs = installed["app"] / "train_runs" / MODEL
    checkpoints = sorted((runs / "checkpoints").glob("*.pt"))
    assert 1 <= len(checkpoints) <= 2, checkpoints  # AtomicCheckpointSaver keeps the newest two
    # the served model is still served after training
    status, _ = _post(server, f"/infer/{MODEL}?image=anatomical&output=image")
    assert status == 200


def test_serving_and_training_write_nothing_into_the_bundle_but_its_weights(installed, server):
    after = _files_under(installed["bundle"])
    before = installed["bundle_files"]
    # training writes the weights and, beside them, the settings they were trained with (scripts/model_settings.py)
    assert set(after) - set(before) <= {"models/model.settings.json"}, sorted(set(after) ^ set(before))
    assert set(before) <= set(after), sorted(set(before) - set(after))
    changed = sorted(path for path in before if after[path] != before[path])
    assert changed in ([], ["models/model.pt"]), changed
    if "models/model.settings.json" in after:  # the served labels are stored as the model's class names
        settings = json.loads((installed["bundle"] / "models" / "model.settings.json").read_text())
        assert settings["class_names"] == ["background", "dim object", "bright object"]

"""The segmentation bundle configs (train, evaluate, inference, multi-GPU), run in-process with tiny overrides, and
MONAI's bundle tools (verify_net_in_out, ckpt_export) run by subprocess as users run them."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
import ignite.distributed as idist
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from PIL import Image

from conftest import REPO_ROOT
from scripts.segmentation.datalist import SegmentationDataError
from scripts.segmentation.embedded import prepare_segmentation_data
from scripts.weights import WeightFileError

# ITK (the DICOM reader MONAI picks) warns about its SWIG types on import
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")

CONFIGS = REPO_ROOT / "configs"
CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
CT_SERIES = Path(pydicom.data.get_testdata_file("DICOMDIR")).parent / "98892001" / "CT5N"
TINY = {"image_size": 32, "batch_size": 4, "num_workers": 0}


def small_datalist(source: Path, destination: Path, counts: dict[str, int]) -> Path:
    """A datalist with the first ``counts[split]`` items of each split of an embedded datalist, and its labels, with
    absolute paths (a datalist's relative paths are relative to its own folder)."""
    full = json.loads((source / "datalist.json").read_text())
    small = {"labels": full["labels"],
             **{split: [{key: str(source / path) for key, path in item.items()} for item in full[split][:count]]
                for split, count in counts.items()}}
    path = destination / "datalist.json"
    path.write_text(json.dumps(small))
    return path


def workflow(config: str | list[str], workflow_type: str, **override) -> ConfigWorkflow:
    files = [str(CONFIGS / name) for name in ([config] if isinstance(config, str) else config)]
    return ConfigWorkflow(config_file=files if len(files) > 1 else files[0], workflow_type=workflow_type,
                          logging_file=str(CONFIGS / "logging.conf"), **override)


def run(flow: ConfigWorkflow) -> None:
    flow.initialize()
    flow.run()
    flow.finalize()


@pytest.fixture(scope="module")
def data_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(prepare_segmentation_data(tmp_path_factory.mktemp("seg")))


@pytest.fixture(scope="module")
def datalist_2d(data_2d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four training, two validation and two test images."""
    return small_datalist(data_2d, tmp_path_factory.mktemp("datalist"), {"training": 4, "validation": 2, "test": 2})


@pytest.fixture(scope="module")
def trained(data_2d: Path, datalist_2d: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One epoch of the 2D ResNet-50 U-Net on four images, validated on two."""
    folder = tmp_path_factory.mktemp("train")
    datalist = datalist_2d
    paths = {"output_dir": folder / "run", "best_model_path": folder / "model.pt", "datalist_file": datalist}
    run(workflow("train.json", "train", dataset_dir=str(data_2d), datalist_file=str(datalist),
                 output_dir=str(paths["output_dir"]), best_model_path=str(paths["best_model_path"]),
                 max_epochs=1, val_interval=1, **TINY))
    return paths


@pytest.mark.parametrize(
    ("configs", "workflow_type"),
    [("train.json", "train"), (["train.json", "multi_gpu_train.json"], "train"), ("evaluate.json", "eval"),
     ("inference.json", "infer")],
)
def test_configs_have_the_properties_monai_expects(configs: str | list[str], workflow_type: str, data_2d: Path,
                                                   datalist_2d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a one-process group for the multi-GPU config, whose initialize joins one
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}.items():
        monkeypatch.setenv(name, value)
    overrides = {"dataset_dir": str(data_2d), "datalist_file": str(datalist_2d)}
    if workflow_type == "infer":
        overrides = {"dataset_dir": str(data_2d / "imagesTs")}
    flow = workflow(configs, workflow_type, **overrides, **TINY)
    flow.initialize()  # MONAI's property getters need an initialised workflow; they instantiate each property
    try:
        assert flow.check_properties() == []
    finally:
        if torch.distributed.is_initialized():
            idist.finalize()  # leaves the group and resets Ignite's cached (native) computation model
        else:
            flow.finalize()


def test_train_writes_best_model_as_plain_state_dict_checkpoints_and_logs(trained: dict[str, Path]) -> None:
    state = torch.load(trained["best_model_path"], weights_only=True)
    network = workflow("inference.json", "infer").parser.get_parsed_content("network_def")
    network.load_state_dict(state)  # strict: the exact keys of the network, no wrapper
    assert sorted(p.name for p in (trained["output_dir"] / "checkpoints").iterdir()) == ["checkpoint_1.pt"]
    checkpoint = torch.load(trained["output_dir"] / "checkpoints" / "checkpoint_1.pt", weights_only=True)
    assert {"model", "optimizer", "best_model_saver", "trainer"} <= set(checkpoint)
    assert list(trained["output_dir"].glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_3d_as_slices_training_samples_slices_and_validates_volumes(data_2d: Path, tmp_path: Path) -> None:
    data_3d = Path(prepare_segmentation_data(data_2d.parent, volumetric=True))
    datalist = small_datalist(data_3d, tmp_path, {"training": 1, "validation": 1})
    flow = workflow("train.json", "train", volumetric=True, dataset_dir=str(data_3d), datalist_file=str(datalist),
                    output_dir=str(tmp_path / "run"), best_model_path=str(tmp_path / "model.pt"),
                    max_epochs=1, val_interval=1, slices_per_volume=4, **TINY)
    flow.initialize()
    batch = next(iter(flow.parser.get_parsed_content("train#dataloader")))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["label"].shape == (4, 1, 32, 32)
    evaluator = flow.parser.get_parsed_content("validate#evaluator")
    shapes = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: shapes.append(e.state.output[0]["pred"].shape))
    flow.run()
    assert shapes == [(3, 64, 64, 36)]  # the whole volume, one-hot, at its own size
    assert 0.0 <= evaluator.state.metrics["val_mean_dice"] <= 1.0
    assert (tmp_path / "model.pt").is_file()


def test_evaluate_writes_dice_iou_hd95_per_class_as_csv(trained: dict[str, Path], data_2d: Path,
                                                         tmp_path: Path) -> None:
    run(workflow("evaluate.json", "eval", dataset_dir=str(data_2d), datalist_file=str(trained["datalist_file"]),
                 checkpoint=str(trained["best_model_path"]), output_dir=str(tmp_path), **TINY))
    with open(tmp_path / "per_class_metrics.csv") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["metric", "dim object", "bright object", "mean"]
    assert sorted(row[0] for row in rows[1:]) == ["hd95", "mean_dice", "mean_iou"]
    values = {row[0]: [float(v) for v in row[1:]] for row in rows[1:]}
    for metric in ("mean_dice", "mean_iou"):
        assert all(0.0 <= v <= 1.0 or np.isnan(v) for v in values[metric])
    with open(tmp_path / "mean_dice_raw.csv") as file:
        per_image = list(csv.reader(file))
    assert len(per_image) == 3 and per_image[1][0].endswith(".png")


def test_inference_keeps_format_shape_and_geometry(trained: dict[str, Path], data_2d: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    png = inputs / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((40, 72)) * 255).astype(np.uint8)).save(png)
    volume_data = np.random.default_rng(1).random((20, 24, 7)).astype(np.float32)
    affine = np.array([[0.0, -0.7, 0, 12.0], [0.9, 0, 0, -4.0], [0, 0, 3.0, 25.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(volume_data, affine), inputs / "volume.nii.gz")
    shutil.copy(CT_SMALL, inputs / "ct.dcm")
    shutil.copytree(CT_SERIES, inputs / "series")
    output = tmp_path / "out"
    # DICOM inputs as NIfTI here, to check their geometry; the default DICOM-SEG output: tests/test_dicom_seg.py
    run(workflow("inference.json", "infer", dataset_dir=str(inputs), checkpoint=str(trained["best_model_path"]),
                 output_dir=str(output), dicom_seg=False, **TINY))

    mask_png = Image.open(output / "photo_seg.png")
    assert mask_png.size == (72, 40) and mask_png.mode == "L"
    assert set(np.unique(np.asarray(mask_png))) <= {0, 1, 2}

    mask = nib.load(output / "volume_seg.nii.gz")
    assert mask.shape == (20, 24, 7)
    np.testing.assert_allclose(mask.affine, affine, atol=1e-5)
    assert mask.get_data_dtype() == np.uint8

    ct_mask = nib.load(output / "ct_seg.nii.gz")
    ds = pydicom.dcmread(CT_SMALL)
    assert ct_mask.shape[:2] == (ds.Rows, ds.Columns) and int(np.prod(ct_mask.shape[2:])) == 1
    # DICOM geometry in NIfTI's RAS convention: x and y of the patient position flip sign, spacing kept
    position = [float(v) for v in ds.ImagePositionPatient]
    np.testing.assert_allclose(ct_mask.affine[:3, 3], [-position[0], -position[1], position[2]], atol=1e-3)
    np.testing.assert_allclose(np.abs(ct_mask.affine[:2, :2]).sum(axis=0), [float(v) for v in ds.PixelSpacing],
                               atol=1e-4)

    series_mask = nib.load(output / "series_seg.nii.gz")
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(CT_SERIES.iterdir())]
    assert series_mask.shape == (slices[0].Rows, slices[0].Columns, len(slices))
    heights = sorted(float(d.ImagePositionPatient[2]) for d in slices)
    assert abs(series_mask.affine[2, 2]) == pytest.approx(heights[1] - heights[0], abs=1e-3)
    assert series_mask.affine[2, 3] == pytest.approx(heights[0], abs=1e-3)


def test_inference_of_one_image_given_as_datalist(trained: dict[str, Path], data_2d: Path, tmp_path: Path) -> None:
    image = next((data_2d / "imagesTs").iterdir())
    run(workflow("inference.json", "infer", datalist=[{"image": str(image)}],
                 checkpoint=str(trained["best_model_path"]), output_dir=str(tmp_path), **TINY))
    # the mask, and the failure summary every inference run writes (its header only here)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([image.name.replace(".png", "_seg.png"),
                                                                 "failed_inputs.csv"])
    assert (tmp_path / "failed_inputs.csv").read_text().splitlines() == ["input,reason"]


def parse_error(flow: ConfigWorkflow, id: str) -> BaseException:
    """The error behind MONAI's "Failed to evaluate/instantiate" wrapper when ``id`` is parsed."""
    with pytest.raises(Exception) as caught:
        flow.parser.get_parsed_content(id)
    error: BaseException = caught.value
    while error.__cause__ is not None and not isinstance(error, (SegmentationDataError, WeightFileError)):
        error = error.__cause__
    return error


def test_bad_inputs_fail_before_the_run_naming_the_file(data_2d: Path, tmp_path: Path) -> None:
    missing = workflow("inference.json", "infer", datalist=[{"image": str(tmp_path / "absent.nii.gz")}])
    error = parse_error(missing, "dataset")
    assert isinstance(error, SegmentationDataError) and "absent.nii.gz: no such file" in str(error)

    volume = Path(prepare_segmentation_data(tmp_path, volumetric=True)) / "labelsTr" / "case_000.nii.gz"
    pairs = {"training": [{"image": str(next((data_2d / "imagesTr").iterdir())), "label": str(volume)}]}
    (tmp_path / "bad.json").write_text(json.dumps(pairs))
    mismatch = workflow("train.json", "train", dataset_dir=str(data_2d), datalist_file=str(tmp_path / "bad.json"))
    error = parse_error(mismatch, "train#dataset#data")
    assert isinstance(error, SegmentationDataError) and "case_000.nii.gz: label shape (64, 64, 36)" in str(error)

    colour = tmp_path / "colour.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(colour)
    rgb = workflow("inference.json", "infer", datalist=[{"image": str(colour)}])
    error = parse_error(rgb, "dataset")
    assert isinstance(error, SegmentationDataError)
    assert "colour.png: image has 3 channels but the network takes in_channels=1" in str(error)

    weights = workflow("train.json", "train", pretrained_encoder=str(tmp_path / "lvmmed_resnet.torch"))
    error = parse_error(weights, "network")
    assert isinstance(error, WeightFileError) and "lvmmed_resnet.torch does not exist" in str(error)


def bundle_tool(*args: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=600)


def test_verify_net_in_out_passes_against_metadata() -> None:
    result = bundle_tool("verify_net_in_out", "--net_id", "network_def", "--meta_file", "configs/metadata.json",
                         "--config_file", "configs/inference.json")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def test_ckpt_export_writes_torchscript_equal_to_the_network(trained: dict[str, Path], tmp_path: Path) -> None:
    exported = tmp_path / "model.ts"
    result = bundle_tool("ckpt_export", "network_def", "--filepath", str(exported),
                         "--ckpt_file", str(trained["best_model_path"]), "--meta_file", "configs/metadata.json",
                         "--config_file", "configs/inference.json")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(exported), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    network = workflow("inference.json", "infer").parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(trained["best_model_path"], weights_only=True))
    x = torch.randn(1, 1, 64, 64)
    torch.testing.assert_close(scripted.eval()(x), network.eval()(x))


@pytest.mark.slow
def test_a_few_epochs_beat_the_untrained_network(data_2d: Path) -> None:
    from scripts.segmentation.learning_check import learning_check

    dice = learning_check(dataset_dir=str(data_2d), image_size=64, max_epochs=6, val_interval=3)
    assert dice["trained"] > dice["untrained"] + 0.2


@pytest.mark.slow
def test_multi_gpu_config_trains_under_torchrun_with_gloo(data_2d: Path, datalist_2d: Path, tmp_path: Path) -> None:
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "monai.bundle", "run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
               "--dataset_dir", str(data_2d), "--datalist_file", str(datalist_2d), "--output_dir", str(tmp_path / "run"),
               "--best_model_path", str(tmp_path / "model.pt"), "--max_epochs", "1", "--val_interval", "1",
               "--image_size", "32", "--batch_size", "2"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert log.count("SupervisedTrainer - INFO - Engine run finished") == 2
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in state)

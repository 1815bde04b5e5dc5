"""Every inference config goes on past unreadable inputs, names each in the log and a summary, and fails at the end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import DataLoader
from PIL import Image

from conftest import REPO_ROOT
from scripts.data.input_failures import InputFailureError, InputFailures, SplitFailures, TolerantDataset

sys.path.insert(0, str(Path(__file__).parent))
from test_cls_workflow import TINY_VIT  # noqa: E402

GOOD, BAD = ("good_0", "good_1"), ("broken", "cut", "notes")
TINY_SAM = {"image_size": 64, "encoder_image_size": 64, "encoder#embed_dim": 64, "encoder#depth": 2,
            "encoder#num_heads": 2, "encoder#window_size": 4, "encoder#global_attn_indexes": [1]}


def mixed_folder(folder: Path) -> Path:
    """Two good 32 x 32 PNGs; bad: a NIfTI cut in half, a PNG cut after its header (only the full read fails) and
    a ``.png`` holding text."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in GOOD:
        pixels = rng.integers(0, 60, (32, 32)).astype(np.uint8)
        pixels[8:20, 10:24] = 200
        Image.fromarray(pixels).save(folder / f"{name}.png")
    nifti = folder / "broken.nii"
    nib.save(nib.Nifti1Image(rng.random((32, 32), dtype=np.float32), np.eye(4)), nifti)
    nifti.write_bytes(nifti.read_bytes()[: nifti.stat().st_size // 2])
    (folder / "notes.png").write_text("not an image, a text file named .png\n")
    good = (folder / "good_0.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    boxes = {f"{name}{suffix}": [8, 6, 26, 22] for name, suffix in (*((g, ".png") for g in GOOD),
                                                                    ("broken", ".nii"), ("cut", ".png"), ("notes", ".png"))}
    (folder / "boxes.json").write_text(json.dumps(boxes))  # prompt segmentation reads one box per image
    return folder


def settings(config: str, folder: Path, tmp_path: Path) -> tuple[dict, str]:
    """Overrides for a small random-weight run of ``config`` on ``folder``, and the component saved as its model."""
    model = str(tmp_path / "model.pt")
    output = {"output_dir": str(tmp_path / "out")}
    if config == "inference":
        return {**output, "dataset_dir": str(folder), "checkpoint": model, "image_size": 32}, "network_def"
    if config == "inference_cls":
        return {**output, "input_dir": str(folder), "model_path": model, "encoder": TINY_VIT, "image_size": 32,
                "class_names": ["a", "b"]}, "network_def"
    if config == "inference_det":
        return {**output, "input_dir": str(folder), "model_path": model, "image_size": 32, "fpn_channels": 8,
                "class_names": ["lesion"]}, "network_def"
    return {**output, "dataset_dir": str(folder), "model_path": model, **TINY_SAM}, "medsam"


def save_random_model(config: str, overrides: dict, component: str, path: str) -> None:
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / f"{config}.json"))
    parser.update({**overrides, "bundle_root": str(REPO_ROOT)})
    torch.save(parser.get_parsed_content(component).state_dict(), path)


def output_text(folder: Path) -> str:
    """The names and the text of every output but the failure summary."""
    parts = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "failed_inputs.csv":
            parts.append(path.name)
            if path.suffix in (".csv", ".json"):
                parts.append(path.read_text())
    return "\n".join(parts)


@pytest.mark.parametrize("config", ["inference", "inference_cls", "inference_det", "inference_prompt_seg"])
def test_each_readable_input_is_processed_and_each_bad_one_reported(config: str, tmp_path: Path, caplog) -> None:
    folder = mixed_folder(tmp_path / "inputs")
    overrides, component = settings(config, folder, tmp_path)
    save_random_model(config, overrides, component, str(tmp_path / "model.pt"))
    workflow = ConfigWorkflow(config_file=str(REPO_ROOT / "configs" / f"{config}.json"), workflow_type="infer",
                              logging_file=False, bundle_root=str(REPO_ROOT), **overrides)
    workflow.initialize()
    workflow.run()
    with pytest.raises(RuntimeError) as wrapped:  # MONAI wraps what a config expression raises
        workflow.finalize()
    caught = wrapped.value.__cause__
    assert isinstance(caught, InputFailureError) and "3 input(s) could not be read" in str(caught)
    assert all(name in str(caught) for name in ("broken.nii", "cut.png", "notes.png"))

    outputs = output_text(tmp_path / "out")
    assert all(name in outputs for name in GOOD), outputs
    assert not any(name in outputs for name in BAD), outputs
    rows = list(csv.DictReader((tmp_path / "out" / "failed_inputs.csv").open()))
    assert sorted(Path(row["input"]).name for row in rows) == ["broken.nii", "cut.png", "notes.png"]
    assert all(row["reason"] for row in rows)
    for row in rows:
        assert f"cannot read input {row['input']}" in caplog.text


@pytest.mark.slow  # 30 s: a separate process
def test_bundle_run_exits_non_zero_after_writing_the_good_masks(tmp_path: Path) -> None:
    folder = mixed_folder(tmp_path / "inputs")
    overrides, component = settings("inference", folder, tmp_path)
    save_random_model("inference", overrides, component, str(tmp_path / "model.pt"))
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "InputFailureError: 3 input(s) could not be read" in log
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["good_0_seg.png", "good_1_seg.png"]



def test_stop_on_error_stops_at_the_first_unreadable_input(tmp_path: Path) -> None:
    overrides, component = settings("inference", mixed_folder(tmp_path / "inputs"), tmp_path)
    save_random_model("inference", overrides, component, str(tmp_path / "model.pt"))
    stopping = ConfigWorkflow(config_file=str(REPO_ROOT / "configs" / "inference.json"), workflow_type="infer",
                              logging_file=False, stop_on_error=True, **{**overrides, "output_dir": str(tmp_path / "o")})
    stopping.initialize()
    with pytest.raises(RuntimeError) as wrapped:  # MONAI wraps what a config expression raises
        stopping.run()
    error = wrapped.value
    while not isinstance(error, InputFailureError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, InputFailureError), wrapped.value
    assert "broken.nii: " in str(error) and "(stop_on_error=True" in str(error)  # the first by name
    rows = list(csv.DictReader((tmp_path / "o" / "failed_inputs.csv").open()))
    assert [Path(row["input"]).name for row in rows] == ["broken.nii"]
    assert not list((tmp_path / "o").glob("*.png"))


def test_no_readable_input_fails_at_once_and_a_clean_run_empties_a_stale_summary(tmp_path: Path) -> None:
    def read(item: dict) -> dict:
        if item["image"].startswith("bad"):
            raise ValueError(f"{item['image']}: unreadable")
        return {"image": torch.zeros(1)}

    failures = InputFailures(tmp_path / "failed_inputs.csv")
    loader = DataLoader(TolerantDataset([{"image": "bad_a"}, {"image": "bad_b"}], read), batch_size=2,
                        collate_fn=SplitFailures())
    with pytest.raises(InputFailureError, match=r"none of the inputs could be read: bad_a \(ValueError: bad_a: "):
        list(failures.readable(loader))
    assert len(list(csv.DictReader((tmp_path / "failed_inputs.csv").open()))) == 2  # written before it raised
    with pytest.raises(InputFailureError, match=r"2 input\(s\) could not be read"):
        failures.finish()

    clean = InputFailures(tmp_path / "failed_inputs.csv", outputs="masks")
    batches = list(clean.readable(DataLoader(TolerantDataset([{"image": "good"}] * 3, read), batch_size=2,
                                             collate_fn=SplitFailures())))
    assert len(batches) == 2
    clean.finish()
    assert (tmp_path / "failed_inputs.csv").read_text().splitlines() == ["input,reason"]
    assert clean.summary() == f"3 masks written to {tmp_path}, 0 failed ({tmp_path / 'failed_inputs.csv'})"


def test_a_single_unreadable_input_is_listed_and_named_first(tmp_path: Path) -> None:
    """One input that fails the workflow's header check: failed_inputs.csv lists it, and the error names it."""
    def check(items: list, **options) -> list:
        raise ValueError(f"{items[0]['image']}: image has 4 channels")

    failures = InputFailures(tmp_path / "out" / "failed_inputs.csv")
    with pytest.raises(InputFailureError, match=r"^ValueError: only.png: image has 4 channels \(listed in "):
        failures.screen([{"image": "only.png"}], check)
    rows = list(csv.DictReader((tmp_path / "out" / "failed_inputs.csv").open()))
    assert rows == [{"input": "only.png", "reason": "ValueError: only.png: image has 4 channels"}]

"""A failed ``python -m monai.bundle run`` prints its root cause first, on one line naming the file or key, and the
traceback only with ``LVMMED_DEBUG=1`` (scripts/error_report.py); a misspelt override stops with its near match."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from scripts.config_checks import ConfigValueError, dropped_none_overrides
from scripts.error_report import format_report, root_cause
from scripts.segmentation.datalist import SegmentationDataError

# MONAI's own notice, printed before any bundle code runs, whatever the outcome
MONAI_NOTICE = "Only proceed if this config is from a source you trust"


def bundle_run(tmp_path: Path, config: str, *arguments: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LVMMED_DEBUG", None)
    if debug:
        env["LVMMED_DEBUG"] = "1"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}",
               "--output_dir", str(tmp_path / "run"), *arguments]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    assert done.returncode != 0, done.stdout[-2000:]
    return [line for line in done.stderr.splitlines() if line.strip() and MONAI_NOTICE not in line]


def png(path: Path, shape: tuple[int, ...], mode: str | None = None) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8), mode).save(path)
    return path


def datalist(tmp_path: Path, image: Path, label: Path) -> Path:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": str(image), "label": str(label)}], "validation": []}))
    return path


def test_missing_datalist(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    lines = error_lines(bundle_run(tmp_path, "train.json", "--datalist_file", str(missing)))
    # caught by the config check at start, before any data is read: the key and the file on the first line
    assert lines[0] == f"ConfigValueError: configs/train.json: datalist_file='{missing}': no such file"
    assert len(lines) == 2 and "LVMMED_DEBUG=1" in lines[1]  # no traceback


def test_mask_whose_size_differs_from_its_image(tmp_path: Path) -> None:
    image, mask = png(tmp_path / "image.png", (40, 40)), png(tmp_path / "mask.png", (32, 32))
    lines = error_lines(bundle_run(tmp_path, "train.json", "--datalist_file", str(datalist(tmp_path, image, mask))))
    assert lines[0].startswith(f"SegmentationDataError: {mask}: label shape (32, 32) differs"), lines[0]


def test_rgba_png(tmp_path: Path) -> None:
    image, mask = png(tmp_path / "image.png", (40, 40, 4), "RGBA"), png(tmp_path / "mask.png", (40, 40))
    lines = error_lines(bundle_run(tmp_path, "train.json", "--datalist_file", str(datalist(tmp_path, image, mask))))
    assert lines[0].startswith(f"SegmentationDataError: {image}: image has"), lines[0]
    assert "in_channels=1" in lines[0]


def test_empty_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    weights = tmp_path / "model.pt"  # the run stops at the folder, before the weights are read
    weights.touch()
    lines = error_lines(bundle_run(tmp_path, "inference.json", "--dataset_dir", str(empty),
                                   "--checkpoint", str(weights)))
    assert lines[0] == f"SegmentationDataError: input folder {empty} holds no PNG, JPEG, NIfTI or DICOM image"


def test_a_single_unreadable_inference_input_is_named_first_and_listed(tmp_path: Path) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    image = png(folder / "rgba.png", (40, 40, 4), "RGBA")
    weights = tmp_path / "model.pt"  # the run stops at the input check, before the weights are read
    weights.touch()
    lines = error_lines(bundle_run(tmp_path, "inference.json", "--dataset_dir", str(folder),
                                   "--checkpoint", str(weights)))
    assert lines[0].startswith(f"InputFailureError: SegmentationDataError: {image}: image has"), lines[0]
    rows = list(csv.DictReader((tmp_path / "run" / "failed_inputs.csv").open()))
    assert [row["input"] for row in rows] == [str(image)]


def test_missing_pretrained_encoder_with_the_traceback_on_request(tmp_path: Path) -> None:
    missing = tmp_path / "encoder.pt"
    done = bundle_run(tmp_path, "train.json", "--pretrained_encoder", str(missing), debug=True)
    lines = error_lines(done)
    assert lines[0] == f"ConfigValueError: configs/train.json: pretrained_encoder='{missing}': no such file"
    assert "Traceback (most recent call last)" in done.stderr  # LVMMED_DEBUG=1 shows it
    assert "Failed to evaluate ConfigExpression" in done.stderr


def test_misspelt_override_stops_with_its_near_match(tmp_path: Path) -> None:
    lines = error_lines(bundle_run(tmp_path, "train.json", "--max_epoch", "1"))
    assert lines[0].startswith("ConfigValueError: unknown config key 'max_epoch' (set to 1)"), lines[0]
    assert "did you mean 'max_epochs'?" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing trained


def test_a_none_override_that_monai_would_drop_stops_the_run_naming_the_value_that_works(tmp_path: Path) -> None:
    lines = error_lines(bundle_run(tmp_path, "pretrain.json", "--monitor_interval", "None", "--max_epochs", "1"))
    assert lines[0].startswith("ConfigValueError: `--monitor_interval None` is ignored by MONAI's command line"), lines[0]
    assert "monitor_interval=1" in lines[0] and "`--monitor_interval 0` turns it off" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing trained


def test_dropped_none_overrides_are_the_none_requests_the_config_does_not_hold() -> None:
    config = {"monitor_interval": 1, "max_grad_norm": None, "pretrained_encoder": "", "seed": 0}
    argv = ["/x/monai/bundle/__main__.py", "run", "--monitor_interval", "None", "--max_grad_norm", "None",
            "--pretrained_encoder=None", "--seed", "3", "--unknown", "None"]
    messages = dropped_none_overrides(argv, config)
    assert len(messages) == 2  # max_grad_norm already is None; unknown keys are check_config's other message
    assert messages[0].startswith("`--monitor_interval None`") and "`--monitor_interval 0` turns it off" in messages[0]
    assert messages[1].startswith("`--pretrained_encoder None`") and "null in a config file" in messages[1]
    assert dropped_none_overrides(argv[:2] + ["--monitor_interval", "0"], config) == []


def _wrapped(error: BaseException) -> RuntimeError:
    """``error`` as MONAI's config expression re-raises it."""
    try:
        try:
            raise error
        except BaseException as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression: $f(@x)") from inner
    except RuntimeError as outer:
        return outer


def test_root_cause_is_the_bundles_error_behind_monais_wrappers() -> None:
    data_error = SegmentationDataError("image of datalist item 0: a.png: no such file")
    try:
        try:
            raise FileNotFoundError("a.png")
        except FileNotFoundError as missing:
            raise data_error from missing
    except SegmentationDataError:
        pass
    assert root_cause(_wrapped(data_error)) is data_error  # the bundle's error, not the OSError behind it


def test_a_bug_keeps_its_traceback_after_the_cause() -> None:
    report = format_report(_wrapped(ZeroDivisionError("division by zero")))
    lines = report.splitlines()
    assert lines[0] == "ZeroDivisionError: division by zero"
    assert lines[1] == "Traceback (most recent call last):"
    assert "Failed to evaluate ConfigExpression" in report


def test_input_error_report_is_two_lines_and_one_line_per_message() -> None:
    report = format_report(_wrapped(ConfigValueError("configs/x.json: a=1 must be\nTrue or False")))
    assert report.splitlines() == ["ConfigValueError: configs/x.json: a=1 must be True or False",
                                   "(the full traceback: set LVMMED_DEBUG=1 and run the command again)"]


@pytest.mark.parametrize("debug", ["1", "0"])
def test_the_hook_of_a_process_that_imports_the_bundle(debug: str, tmp_path: Path) -> None:
    code = "import scripts; raise ValueError('bad value')"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "LVMMED_DEBUG": debug}, timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == "ValueError: bad value"
    assert ("Traceback" in done.stderr) == (debug == "1")

"""Runs cannot mix (run identity in each checkpoint) and a model's settings travel with it (``*.settings.json``).

A small TransUNet is trained at 32 px by ``configs/train.json``; evaluation, inference and ONNX export then run with
no repeated setting and use the stored ones; a second dataset in the same output folder stops with a message naming
``--resume False``; a finished run does not exit quietly having trained nothing.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pydicom
import pytest
import torch
from ignite.engine import Events
from monai.handlers import StatsHandler
from PIL import Image

from conftest import REPO_ROOT
from scripts.handlers.checkpoint import (AtomicCheckpointSaver, ResumeFromLatest, RunNotResumed,
                                         checkpoints_newest_first)
from scripts.model_settings import (ModelSettingsError, class_names, read_settings, run_identity, settings_path,
                                    warn_contradictions, write_settings)
from scripts.networks.transunet import TransUNet
from scripts.onnx_export import main as onnx_export
from scripts.segmentation.embedded import prepare_segmentation_data
from test_reliability_checkpoint import trainer_with
from test_seg_workflows import CT_SERIES, run, small_datalist, workflow

pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")

OPTIONS = {"vit_img_size": 32, "vit_args": {"embed_dim": 16, "depth": 1, "num_heads": 2, "global_attn_indexes": [0],
                                            "window_size": 2}, "skip_channels": [4, 4, 4, 4]}
SMALL = {"architecture": "transunet", "network_options": OPTIONS, "image_size": 32}
EMBEDDED_NAMES = ["background", "dim object", "bright object"]


# ---------------------------------------------------------------- the settings file and the run identity


def test_settings_are_written_beside_the_weights_and_read_back(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    assert settings_path(weights) == tmp_path / "model.settings.json"
    assert read_settings(weights) == {}  # no file: the configs keep their defaults
    write_settings(weights, {"image_size": 32, "intensity_window": (0, 80)})
    stored = read_settings(weights)
    assert stored["image_size"] == 32 and stored["intensity_window"] == [0, 80]
    assert stored["run_identity"] == run_identity({"intensity_window": [0, 80], "image_size": 32})
    assert list(tmp_path.iterdir()) == [settings_path(weights)]  # no temporary file left
    settings_path(weights).write_text("{not json")
    with pytest.raises(ModelSettingsError, match=r"model\.settings\.json: cannot read"):
        read_settings(weights)


def test_run_identity_depends_on_values_not_on_key_order() -> None:
    assert run_identity({"a": 1, "b": [1, 2]}) == run_identity({"b": (1, 2), "a": 1})
    assert run_identity({"a": 1, "b": [1, 2]}) != run_identity({"a": 1, "b": [1, 3]})


def test_class_names_come_from_the_given_names_then_the_datalist_labels(tmp_path: Path, caplog) -> None:
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "tumour"}, "training": []}))
    assert class_names(3, ["bg", "a", "b"], datalist) == ["bg", "a", "b"]
    assert class_names(3, None, datalist) == ["background", "liver", "tumour"]
    with caplog.at_level(logging.WARNING, logger="scripts.model_settings"):
        assert class_names(2, ["bg", "a", "b"], datalist) == ["background", "class 1"]
    assert "name 3 classes" in caplog.text and "num_classes is 2" in caplog.text
    assert class_names(2, background=False) == ["class 0", "class 1"]
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        class_names(0)


def test_a_contradicting_value_is_warned_about_naming_both(tmp_path: Path, caplog) -> None:
    stored = {"image_size": 32, "class_names": ["background", "liver"]}
    with caplog.at_level(logging.WARNING, logger="scripts.model_settings"):
        same = warn_contradictions(tmp_path / "model.pt", stored, image_size=32, class_names=("background", "liver"))
        assert same == []
        assert not caplog.text
        found = warn_contradictions(tmp_path / "model.pt", stored, image_size=96, normalisation="imagenet")
    assert found == ["image_size=96 (trained with 32)"]
    assert "model.pt was trained with other settings than given: image_size=96 (trained with 32)" in caplog.text


# ---------------------------------------------------------------- resume only the same run


def _saving(folder: Path, settings: dict):
    return lambda model, optimizer: [AtomicCheckpointSaver(folder, {"model": model, "optimizer": optimizer},
                                                           interval=2, run_settings=settings)]


def _resuming(folder: Path, settings: dict | None, resume: bool = True):
    return lambda model, optimizer: [
        ResumeFromLatest(folder, {"model": model, "optimizer": optimizer}, run_settings=settings, resume=resume),
        AtomicCheckpointSaver(folder, {"model": model, "optimizer": optimizer}, interval=2, run_settings=settings)]


def test_a_run_of_other_settings_stops_naming_the_folder_the_difference_and_the_remedies(tmp_path: Path) -> None:
    trainer_with(_saving(tmp_path, {"num_classes": 3, "data": "a"}), max_epochs=1)[0].run()
    trainer, model, _ = trainer_with(_resuming(tmp_path, {"num_classes": 2, "data": "a"}), max_epochs=2)
    before = model.weight.detach().clone()
    with pytest.raises(SystemExit) as stopped:
        trainer.run()
    message = str(stopped.value)
    assert message.startswith(f"error: {tmp_path} holds the checkpoints of another run (checkpoint_4.pt)")
    assert "num_classes: 3 there, 2 now" in message and "data:" not in message
    assert "--resume False" in message and "--output_dir" in message and "\n" not in message
    assert torch.equal(model.weight, before) and trainer.state.iteration == 0  # nothing loaded, nothing trained


def test_a_checkpoint_without_run_identity_is_not_resumed(tmp_path: Path) -> None:
    trainer_with(lambda model, optimizer: [AtomicCheckpointSaver(tmp_path, {"model": model}, interval=2)], 1)[0].run()
    with pytest.raises(SystemExit, match="stores no run identity .*--resume False"):
        trainer_with(_resuming(tmp_path, {"num_classes": 3}), max_epochs=2)[0].run()


def test_the_same_run_resumes_and_a_finished_one_stops_saying_it_would_train_nothing(tmp_path: Path) -> None:
    settings = {"num_classes": 3}
    trainer_with(_saving(tmp_path, settings), max_epochs=1)[0].run()
    trainer = trainer_with(_resuming(tmp_path, settings), max_epochs=2)[0]
    trainer.run()
    assert trainer.state.iteration == 8 and trainer.state.epoch == 2  # resumed at 4, trained the second epoch
    with pytest.raises(SystemExit) as stopped:
        trainer_with(_resuming(tmp_path, settings), max_epochs=2)[0].run()
    assert str(stopped.value).startswith(f"error: nothing to train: the run in {tmp_path} already reached epoch 2")
    assert "--max_epochs above 2" in str(stopped.value) and "--resume False" in str(stopped.value)


def test_the_stop_is_one_line_without_the_traceback_statshandler_logs(tmp_path: Path) -> None:
    trainer_with(_saving(tmp_path, {"num_classes": 3}), max_epochs=1)[0].run()
    stats, logged = StatsHandler(iteration_log=False, epoch_log=False, name="stats_of_this_test"), []
    log_exception = stats.exception_raised  # MONAI's StatsHandler logs the exceptions reaching it, with a traceback
    stats.exception_raised = lambda engine, error: logged.append(error) or log_exception(engine, error)

    def with_stats(model, optimizer):
        return [*_resuming(tmp_path, {"num_classes": 3})(model, optimizer), stats]

    with pytest.raises(RunNotResumed, match="nothing to train"):
        trainer_with(with_stats, max_epochs=1)[0].run()
    assert logged == []
    with pytest.raises(ZeroDivisionError):  # other errors still reach the StatsHandler, and the caller
        trainer_with(lambda model, optimizer: [*with_stats(model, optimizer), _Failing()], max_epochs=2)[0].run()
    assert logged and {type(error) for error in logged} == {ZeroDivisionError}  # (Ignite reports it per loop level)


class _Failing:
    """A handler whose first iteration fails."""

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: 1 / 0)


def test_resume_off_moves_the_old_checkpoints_aside_and_trains_from_scratch(tmp_path: Path) -> None:
    trainer_with(_saving(tmp_path, {"num_classes": 3}), max_epochs=2)[0].run()  # checkpoints 8, 6
    trainer = trainer_with(_resuming(tmp_path, {"num_classes": 2}, resume=False), max_epochs=1)[0]
    trainer.run()
    assert trainer.state.iteration == 4
    assert [p.name for p in checkpoints_newest_first(tmp_path)] == ["checkpoint_4.pt", "checkpoint_2.pt"]
    archived = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(archived) == 1 and archived[0].name.startswith("previous_run_")
    assert sorted(p.name for p in archived[0].iterdir()) == ["checkpoint_6.pt", "checkpoint_8.pt"]
    # the next resume finds this run's checkpoints, not the older run's higher iterations
    resumed = trainer_with(_resuming(tmp_path, {"num_classes": 2}), max_epochs=2)[0]
    resumed.run()
    assert resumed.state.iteration == 8


# ---------------------------------------------------------------- the segmentation workflows


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(prepare_segmentation_data(tmp_path_factory.mktemp("seg")))


@pytest.fixture(scope="module")
def trained(seg_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One epoch of a small TransUNet at 32 px on four images, validated on two."""
    folder = tmp_path_factory.mktemp("small")
    datalist = small_datalist(seg_data, folder, {"training": 4, "validation": 2, "test": 2})
    paths = {"folder": folder, "datalist_file": datalist, "output_dir": folder / "run", "model": folder / "model.pt"}
    run(workflow("train.json", "train", dataset_dir=str(seg_data), datalist_file=str(datalist),
                 output_dir=str(paths["output_dir"]), best_model_path=str(paths["model"]), max_epochs=1,
                 val_interval=1, batch_size=4, **SMALL))
    return paths


def test_training_stores_the_model_settings_and_the_run_identity(trained: dict[str, Path]) -> None:
    stored = read_settings(trained["model"])
    assert {key: stored[key] for key in SMALL} == SMALL
    assert stored["class_names"] == EMBEDDED_NAMES and stored["num_classes"] == 3 and stored["in_channels"] == 1
    assert stored["data"]["items"] == [4, 2] and stored["pretrained_encoder"] is None
    checkpoint = torch.load(checkpoints_newest_first(trained["output_dir"] / "checkpoints")[0], weights_only=True)
    assert checkpoint["run"]["identity"] == stored["run_identity"]


def test_evaluate_and_inference_use_the_stored_settings_without_repeating_them(
        trained: dict[str, Path], seg_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    evaluate = workflow("evaluate.json", "eval", dataset_dir=str(seg_data), datalist_file=str(trained["datalist_file"]),
                        checkpoint=str(trained["model"]), output_dir=str(tmp_path / "evaluate"))
    run(evaluate)  # configs/logging.conf logs to stdout
    assert "trained with other settings" not in capsys.readouterr().out
    assert evaluate.parser.get_parsed_content("image_size") == 32
    assert tuple(evaluate.parser.get_parsed_content("inferer").roi_size)[:2] == (32, 32)
    with open(tmp_path / "evaluate" / "per_class_metrics.csv") as file:
        assert next(csv.reader(file)) == ["metric", "dim object", "bright object", "mean"]

    # inference: masks at each input's size, the network run at 32 px, DICOM-SEG segments named after the classes
    series = tmp_path / "series"
    shutil.copytree(CT_SERIES, series)
    infer = workflow("inference.json", "infer", checkpoint=str(trained["model"]), output_dir=str(tmp_path / "out"),
                     datalist=[{"image": str(next((seg_data / "imagesTs").iterdir()))}, {"image": str(series)}],
                     bundle_root=str(REPO_ROOT))
    sizes = []
    infer.initialize()
    network = infer.parser.get_parsed_content("network")
    network.register_forward_hook(lambda module, inputs, output: sizes.append(tuple(inputs[0].shape[-2:])))
    infer.run()
    infer.finalize()
    assert set(sizes) == {(32, 32)}
    segmentation = pydicom.dcmread(tmp_path / "out" / "series_seg.dcm")
    assert [s.SegmentLabel for s in segmentation.SegmentSequence] == EMBEDDED_NAMES[1:]


def test_an_override_that_contradicts_the_stored_settings_is_warned_about(trained: dict[str, Path], seg_data: Path,
                                                                          tmp_path: Path, capsys) -> None:
    flow = workflow("evaluate.json", "eval", dataset_dir=str(seg_data), datalist_file=str(trained["datalist_file"]),
                    checkpoint=str(trained["model"]), output_dir=str(tmp_path), image_size=64)
    flow.initialize()
    flow.finalize()
    output = capsys.readouterr().out  # configs/logging.conf logs to stdout
    assert "WARNING - " in output
    assert "model.pt was trained with other settings than given: image_size=64 (trained with 32)" in output
    assert "model.settings.json" in output


def test_onnx_export_takes_the_stored_size_and_warns_about_a_contradiction(trained: dict[str, Path], tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    assert onnx_export(["--config_file", "configs/inference.json", "--filepath", str(tmp_path / "model.onnx"),
                        "--ckpt_file", str(trained["model"])]) == 0
    graph_input = onnx.load(tmp_path / "model.onnx").graph.input[0]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim][1:] == [1, 32, 32]
    found = []
    monkeypatch.setattr("scripts.onnx_export.warn_contradictions",
                        lambda weights, stored, **given: found.extend(warn_contradictions(weights, stored, **given)))
    onnx_export(["--config_file", "configs/inference.json", "--filepath", str(tmp_path / "other.onnx"),
                 "--ckpt_file", str(trained["model"]), "--num_classes", "2"])
    assert found == ["num_classes=2 (trained with 3)"]


def _copy_run(trained: dict[str, Path], tmp_path: Path) -> Path:
    output_dir = tmp_path / "run"
    shutil.copytree(trained["output_dir"], output_dir)
    return output_dir


def test_a_second_dataset_in_the_same_output_folder_stops_with_the_remedies(trained: dict[str, Path], seg_data: Path,
                                                                            tmp_path: Path) -> None:
    output_dir = _copy_run(trained, tmp_path)
    other = small_datalist(seg_data, tmp_path, {"training": 3, "validation": 1})
    flow = workflow("train.json", "train", dataset_dir=str(seg_data), datalist_file=str(other),
                    output_dir=str(output_dir), best_model_path=str(tmp_path / "model.pt"), max_epochs=3,
                    batch_size=4, **SMALL)
    flow.initialize()
    with pytest.raises(SystemExit) as stopped:
        flow.run()
    message = str(stopped.value)
    assert message.startswith(f"error: {output_dir / 'checkpoints'} holds the checkpoints of another run")
    assert "data: {'items': [4, 2]" in message and "{'items': [3, 1]" in message
    assert "--resume False" in message and "--output_dir" in message
    assert not (tmp_path / "model.pt").exists()

    # with --resume False the same command trains, and the old run's checkpoints are kept aside
    flow = workflow("train.json", "train", dataset_dir=str(seg_data), datalist_file=str(other),
                    output_dir=str(output_dir), best_model_path=str(tmp_path / "model.pt"), max_epochs=1,
                    batch_size=4, resume=False, **SMALL)
    run(flow)
    assert read_settings(tmp_path / "model.pt")["data"]["items"] == [3, 1]
    assert len(list((output_dir / "checkpoints").glob("previous_run_*/checkpoint_*.pt"))) == 1


def test_rerunning_a_finished_run_stops_instead_of_training_nothing(trained: dict[str, Path], seg_data: Path,
                                                                    tmp_path: Path) -> None:
    output_dir = _copy_run(trained, tmp_path)
    flow = workflow("train.json", "train", dataset_dir=str(seg_data), datalist_file=str(trained["datalist_file"]),
                    output_dir=str(output_dir), best_model_path=str(tmp_path / "model.pt"), max_epochs=1,
                    val_interval=1, batch_size=4, **SMALL)
    flow.initialize()
    with pytest.raises(RunNotResumed, match=r"^error: nothing to train: .* reached epoch 1 .*--max_epochs above 1"):
        flow.run()


def _two_class_data(folder: Path) -> Path:
    """Three 24 x 24 PNG images with a bright square, labelled 0/1, listed for training, validation and test."""
    rng = np.random.default_rng(0)
    items = []
    for index in range(3):
        image = (rng.random((24, 24)) * 60).astype(np.uint8)
        label = np.zeros((24, 24), np.uint8)
        label[4 + index:14 + index, 6:16] = 1
        image[label == 1] += 150
        Image.fromarray(image).save(folder / f"image{index}.png")
        Image.fromarray(label).save(folder / f"label{index}.png")
        items.append({"image": f"image{index}.png", "label": f"label{index}.png"})
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"training": items[:1], "validation": items[1:2], "test": items}))
    return datalist


def test_evaluating_two_classes_writes_the_per_class_table(tmp_path: Path) -> None:
    datalist = _two_class_data(tmp_path)
    torch.save(TransUNet(1, 2, **OPTIONS).state_dict(), tmp_path / "model.pt")  # weights without a settings file
    run(workflow("evaluate.json", "eval", dataset_dir=str(tmp_path), datalist_file=str(datalist),
                 checkpoint=str(tmp_path / "model.pt"), output_dir=str(tmp_path / "evaluate"), num_classes=2, **SMALL))
    with open(tmp_path / "evaluate" / "per_class_metrics.csv") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["metric", "class 1", "mean"]
    assert sorted(row[0] for row in rows[1:]) == ["hd95", "mean_dice", "mean_iou"]

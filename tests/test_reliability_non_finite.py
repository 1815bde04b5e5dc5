"""A NaN injected into the loss of a real workflow stops the run naming the step and its files, or is skipped."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents

from conftest import REPO_ROOT
from scripts.handlers.checkpoint import latest_checkpoint
from scripts.handlers.non_finite import NonFiniteError, batch_sources

sys.path.insert(0, str(Path(__file__).parent))
from test_cls_workflow import TINY_VIT, overrides, tiny_datalist  # noqa: E402

POISONED_ITERATION = 3
TINY_PRETRAIN = {
    "encoder": TINY_VIT, "image_size": 32, "batch_size": 16, "max_epochs": 1, "embedding_dim": 16,
    "loss#gcn_features": [16, 16], "loss#graph_size": 8, "loss#num_neighbors": 3, "monitor_interval": None,
    "balance_modalities": False, "checkpoint_interval": 2, "log_interval": 1,
}


def poison_loss_at(trainer: Engine, iteration: int) -> None:
    """Multiplies the loss by NaN at ``iteration``, between MONAI's loss and backward passes."""

    def poison(engine: Engine) -> None:
        if engine.state.iteration == iteration:
            engine.state.output["loss"] = engine.state.output["loss"] * float("nan")

    trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, poison)


def initialised(config: str, **override) -> tuple[ConfigWorkflow, Engine]:
    workflow = ConfigWorkflow(config_file=str(REPO_ROOT / "configs" / config), logging_file=False, **override)
    workflow.initialize()
    return workflow, workflow.parser.get_parsed_content("train#trainer")


def test_pretraining_stops_at_a_nan_loss_naming_iteration_and_sources_with_finite_checkpoints(tmp_path: Path) -> None:
    workflow, trainer = initialised(
        "pretrain.json", output_dir=str(tmp_path / "run"), data_root=str(tmp_path / "data"),
        encoder_export_path=str(tmp_path / "encoder.pt"), **TINY_PRETRAIN)
    poison_loss_at(trainer, POISONED_ITERATION)
    with pytest.raises(NonFiniteError) as caught:
        trainer.run()
    message = str(caught.value)
    assert f"non-finite loss [nan] and largest gradient nan at iteration {POISONED_ITERATION} (epoch 1)" in message
    sources = message.split("batch from ")[1].split(". The weights")[0].split(", ")
    assert len(sources) > 1 and all(Path(source).is_file() for source in sources)
    assert all(str(tmp_path / "data") in source for source in sources)
    # the weights never saw the NaN: the network and the checkpoint written before the step are finite
    assert all(torch.isfinite(p).all() for p in workflow.parser.get_parsed_content("network").parameters())
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint.name == "checkpoint_2.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())
    assert not (tmp_path / "encoder.pt").exists()  # the export runs only at a completed run


def test_classification_skips_the_nan_step_when_asked_and_reports_it(tmp_path: Path, caplog) -> None:
    settings = overrides(tmp_path, tiny_datalist(tmp_path))
    workflow, trainer = initialised("train_cls.json", encoder=TINY_VIT, max_epochs=2, non_finite="skip", **settings)
    poison_loss_at(trainer, POISONED_ITERATION)
    network = workflow.parser.get_parsed_content("network")
    with caplog.at_level(logging.WARNING, logger="scripts.handlers.non_finite"):
        trainer.run()
    assert trainer.state.iteration == 2 * trainer.state.epoch_length  # the run went on
    assert f"skipping the step: non-finite loss [nan] and largest gradient nan at iteration {POISONED_ITERATION}" \
           in caplog.text
    assert f"skipped 1 steps with a non-finite loss or gradients, at iterations [{POISONED_ITERATION}]" in caplog.text
    assert ".png" in caplog.text.split("batch from ")[1]
    assert all(torch.isfinite(p).all() for p in network.parameters())
    state = torch.load(latest_checkpoint(tmp_path / "run" / "checkpoints"), weights_only=True)
    assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())


def test_batch_sources_finds_names_in_paths_meta_tensors_and_meta_dicts() -> None:
    batch = {"image": MetaTensor(torch.zeros(2, 1), meta={"filename_or_obj": ["a.nii.gz", "b.nii.gz"]}),
             "label_meta_dict": {"filename_or_obj": ["a_label.nii.gz"]}, "path": ["a.nii.gz", "c.png"]}
    assert batch_sources(batch) == ["a.nii.gz", "b.nii.gz", "a_label.nii.gz", "c.png"]
    assert batch_sources([{"source": "x.dcm", "image": torch.zeros(1)}]) == ["x.dcm"]

"""Training as MONAI Label drives it: weights from its ``CheckpointLoader`` win over ``ResumeFromLatest``, and a run
without validation still writes the served ``models/model.pt``."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader

from scripts.handlers.checkpoint import AtomicCheckpointSaver, ResumeFromLatest
from scripts.segmentation.handlers import BestModelSaver, FinalModelSaver


def _engine(network: torch.nn.Module) -> Engine:
    def step(engine: Engine, batch: torch.Tensor) -> None:
        with torch.no_grad():
            network.weight += 1.0  # each iteration leaves a mark on the weights

    return Engine(step)


def test_checkpoint_loader_weights_win_over_resume_and_the_epochs_run_again(tmp_path):
    network = torch.nn.Linear(2, 1, bias=False)
    finished = _engine(network)
    AtomicCheckpointSaver(tmp_path / "checkpoints", {"model": network}, interval=1).attach(finished)
    finished.run([torch.zeros(1)] * 3, max_epochs=2)  # a finished run: checkpoint at epoch 2 of 2

    served = tmp_path / "model.pt"
    torch.save({"weight": torch.full((1, 2), 100.0)}, served)
    again = _engine(network)
    CheckpointLoader(str(served), {"model": network}).attach(again)  # what BundleTrainTask inserts first
    ResumeFromLatest(tmp_path / "checkpoints", {"model": network}).attach(again)
    again.run([torch.zeros(1)] * 3, max_epochs=2)
    assert again.state.epoch == 2 and again.state.iteration == 6  # all epochs ran, not 0
    torch.testing.assert_close(network.weight, torch.full((1, 2), 106.0))  # from the served weights

    resumed = _engine(network)  # without a CheckpointLoader, the finished run would train nothing: it says so
    ResumeFromLatest(tmp_path / "checkpoints", {"model": network}).attach(resumed)
    with pytest.raises(SystemExit, match="nothing to train: .* already reached epoch 2 .* of max_epochs 2"):
        resumed.run([torch.zeros(1)] * 3, max_epochs=2)


def test_final_model_saver_writes_the_last_network_only_when_nothing_was_validated(tmp_path):
    network = torch.nn.Linear(2, 1, bias=False)
    path = tmp_path / "models" / "model.pt"
    best = BestModelSaver(network, path)
    engine = _engine(network)
    FinalModelSaver(network, path, best).attach(engine)
    engine.run([torch.zeros(1)] * 2, max_epochs=1)
    torch.testing.assert_close(torch.load(path, weights_only=True)["weight"], network.weight.detach())

    path.unlink()
    best.best = 0.5  # a validation happened: its best network stays the model
    assert best.best > -math.inf
    engine = _engine(network)
    FinalModelSaver(network, path, best).attach(engine)
    engine.run([torch.zeros(1)] * 2, max_epochs=1)
    assert not path.exists()

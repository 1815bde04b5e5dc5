"""Damaged checkpoints are skipped on resume; a checkpoint save that fails (disk full) keeps the previous ones."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import torch
from monai.engines import SupervisedTrainer

import scripts.atomic_save
from scripts.handlers.checkpoint import (AtomicCheckpointSaver, CheckpointSaveError, ResumeFromLatest,
                                         checkpoints_newest_first)


def trainer_with(handlers_for, max_epochs: int) -> tuple[SupervisedTrainer, torch.nn.Module, torch.optim.Optimizer]:
    """A linear model trained on 4 fixed batches (iterations) per epoch; ``handlers_for(model, optimizer)``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [{"image": torch.randn(2, 3), "label": torch.randn(2, 1)} for _ in range(4)]
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=data,
                                epoch_length=len(data), network=model, optimizer=optimizer,
                                loss_function=torch.nn.MSELoss(), train_handlers=handlers_for(model, optimizer),
                                decollate=False)
    return trainer, model, optimizer


def saver(folder: Path, n_saved: int = 3):
    return lambda model, optimizer: [AtomicCheckpointSaver(folder, {"model": model, "optimizer": optimizer},
                                                           interval=1, n_saved=n_saved)]


def test_resume_skips_a_truncated_and_a_mismatched_checkpoint_naming_them(tmp_path: Path, caplog) -> None:
    trainer, model, _ = trainer_with(saver(tmp_path), max_epochs=1)
    trainer.run()
    assert [p.name for p in checkpoints_newest_first(tmp_path)] == ["checkpoint_4.pt", "checkpoint_3.pt",
                                                                     "checkpoint_2.pt"]
    good = torch.load(tmp_path / "checkpoint_3.pt", weights_only=True)["model"]
    latest = tmp_path / "checkpoint_4.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated, as after a crash of the disk
    torch.save({"model": {"other.weight": torch.zeros(1)}, "optimizer": {}}, tmp_path / "checkpoint_5.pt")

    resumed, resumed_model, _ = trainer_with(
        lambda model, optimizer: [ResumeFromLatest(tmp_path, {"model": model, "optimizer": optimizer})], max_epochs=2)
    with caplog.at_level(logging.WARNING, logger="scripts.handlers.checkpoint"):
        resumed.run()
    assert f"cannot resume from checkpoint {tmp_path / 'checkpoint_5.pt'}" in caplog.text
    assert f"cannot resume from checkpoint {tmp_path / 'checkpoint_4.pt'}" in caplog.text
    assert "checkpoint_3.pt" not in caplog.text
    assert resumed.state.iteration == 8  # resumed at 3 of 8 planned iterations, ran 5 more
    before = trainer_with(lambda model, optimizer: [], max_epochs=1)[1]
    before.load_state_dict(good)
    assert not torch.equal(before.weight, resumed_model.weight)  # it trained on from checkpoint 3's weights


def test_resume_fails_naming_every_file_when_no_checkpoint_loads(tmp_path: Path) -> None:
    (tmp_path / "checkpoint_1.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "checkpoint_2.pt").write_bytes(b"")
    trainer, _, _ = trainer_with(lambda model, optimizer: [ResumeFromLatest(tmp_path, {"model": model})], 1)
    with pytest.raises(RuntimeError, match="cannot read any checkpoint") as caught:
        trainer.run()
    assert "checkpoint_1.pt" in str(caught.value) and "checkpoint_2.pt" in str(caught.value)
    assert "--resume False" in str(caught.value) and "--output_dir" in str(caught.value)


@pytest.mark.parametrize("n_saved", [1, 2])
def test_a_save_failing_with_enospc_keeps_the_previous_checkpoint_and_reports(tmp_path: Path, monkeypatch,
                                                                              n_saved: int) -> None:
    real_save = torch.save
    trainer, _, _ = trainer_with(saver(tmp_path, n_saved=n_saved), max_epochs=1)

    def disk_full_at_iteration_3(state, target, *args, **kwargs):
        if trainer.state.iteration == 3:
            Path(target).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, target, *args, **kwargs)

    monkeypatch.setattr(scripts.atomic_save.torch, "save", disk_full_at_iteration_3)
    with pytest.raises(CheckpointSaveError, match=r"cannot write checkpoint .*checkpoint_3\.pt: No space left") as caught:
        trainer.run()
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    kept = [p.name for p in checkpoints_newest_first(tmp_path)]
    assert kept[0] == "checkpoint_2.pt" and len(kept) == n_saved  # the one Ignite dropped is kept too
    assert "checkpoint_2.pt" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)  # no partial or temporary file
    state = torch.load(tmp_path / "checkpoint_2.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2

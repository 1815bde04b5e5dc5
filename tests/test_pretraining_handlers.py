from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from scripts.handlers.checkpoint import AtomicCheckpointSaver, ResumeFromLatest, latest_checkpoint
from scripts.handlers.embedding_monitor import EmbeddingMonitor, effective_rank, knn_accuracy
from scripts.handlers.encoder_export import EncoderExport
from scripts.handlers.gradient_clipping import GradientClipping
from scripts.handlers.objective_stats import ObjectiveStats
from scripts.networks.projector import ProjectionHead
from scripts.networks.sam_vit import SamViTEncoder
from scripts.networks.ssl_network import LVMMedNetwork
from scripts.objective.lvmmed_loss import LVMMedLoss
from scripts.pretraining.model import PretrainModel, prediction_is_loss, prepare_two_view_batch
from scripts.transforms.two_view import TwoViewAugmentd


def tiny_model() -> PretrainModel:
    encoder = SamViTEncoder(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, out_chans=16,
                            window_size=2, global_attn_indexes=(1,))
    return PretrainModel(LVMMedNetwork(encoder, ProjectionHead(16, 16)),
                         LVMMedLoss(embedding_dim=16, gcn_features=(16, 16), graph_size=4, num_neighbors=2))


def two_view_loader(num_images: int = 16, batch_size: int = 8) -> DataLoader:
    rng = np.random.default_rng(0)
    images = [{"image": rng.random((1, 40, 40), dtype=np.float32)} for _ in range(num_images)]
    transform = TwoViewAugmentd(keys="image", spatial_size=32, drop_source=True)
    return DataLoader(Dataset(images, transform), batch_size=batch_size, shuffle=False)


def make_trainer(model: PretrainModel, handlers: list, max_epochs: int) -> tuple[SupervisedTrainer, torch.optim.Optimizer]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=two_view_loader(), network=model,
        optimizer=optimizer, loss_function=prediction_is_loss, prepare_batch=prepare_two_view_batch,
        train_handlers=handlers, decollate=False,
    )
    return trainer, optimizer


def test_trainer_runs_the_objective_exports_and_checkpoints(tmp_path: Path) -> None:
    model = tiny_model()
    stats = ObjectiveStats(model.objective)
    export_path = tmp_path / "models" / "encoder_vit.pt"
    handlers = [stats, EncoderExport(model.network.encoder, export_path),
                AtomicCheckpointSaver(tmp_path / "ckpt", {"model": model}, interval=1, n_saved=2)]
    trainer, _ = make_trainer(model, handlers, max_epochs=2)
    trainer.run()
    assert np.isfinite(trainer.state.output["loss"].item())
    assert 0.0 <= trainer.state.metrics["match_accuracy"] <= 1.0
    assert 0.0 < trainer.state.metrics["imle_nonzero_share"] <= 1.0
    exported = torch.load(export_path, weights_only=True)
    assert list(exported) == list(model.network.encoder.state_dict())
    assert "blocks.0.attn.rel_pos_h" in exported
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint_3.pt", "checkpoint_4.pt"]
    assert latest_checkpoint(tmp_path / "ckpt").name == "checkpoint_4.pt"


def test_resume_continues_iteration_and_optimizer_state(tmp_path: Path) -> None:
    model = tiny_model()
    first, optimizer = make_trainer(model, [], max_epochs=1)
    AtomicCheckpointSaver(tmp_path, {"model": model, "optimizer": optimizer}, interval=1).attach(first)
    first.run()
    saved_step = optimizer.state_dict()["state"][0]["step"]

    resumed_model = tiny_model()
    second, resumed_optimizer = make_trainer(resumed_model, [], max_epochs=2)
    load = {"model": resumed_model, "optimizer": resumed_optimizer}
    ResumeFromLatest(tmp_path, load).attach(second)
    iterations: list[int] = []
    second.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: iterations.append(engine.state.iteration))
    second.run()
    assert iterations == [3, 4]  # epoch 1 (iterations 1-2) was not run again
    assert resumed_optimizer.state_dict()["state"][0]["step"] == saved_step + 2


def test_resume_without_checkpoint_starts_fresh_and_bad_file_is_named(tmp_path: Path) -> None:
    model = tiny_model()
    trainer, optimizer = make_trainer(model, [ResumeFromLatest(tmp_path, {"model": model})], max_epochs=1)
    trainer.run()
    assert trainer.state.iteration == 2
    (tmp_path / "checkpoint_9.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "checkpoint_12.pt.tmp").write_bytes(b"half written")
    assert latest_checkpoint(tmp_path).name == "checkpoint_9.pt"
    broken, _ = make_trainer(tiny_model(), [ResumeFromLatest(tmp_path, {"model": model})], max_epochs=1)
    with pytest.raises(RuntimeError, match="checkpoint_9.pt"):
        broken.run()


def test_gradient_clipping_bounds_the_update_norm() -> None:
    model = tiny_model()
    norms: list[float] = []

    def record(engine) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    trainer, _ = make_trainer(model, [GradientClipping(max_norm=1e-4)], max_epochs=1)
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, record)
    trainer.run()
    assert norms and max(norms) <= 1e-4 * 1.001
    with pytest.raises(ValueError, match="max_norm"):
        GradientClipping(0.0)


def test_knn_accuracy_and_effective_rank() -> None:
    centres = torch.randn(3, 8) * 10
    labels = torch.arange(3).repeat_interleave(10)
    clustered = centres[labels] + 0.1 * torch.randn(30, 8)
    assert knn_accuracy(clustered, labels, k=3) == 1.0
    shuffled = labels[torch.randperm(30)]
    assert knn_accuracy(clustered, shuffled, k=3) < 0.8
    assert effective_rank(torch.randn(200, 1) @ torch.randn(1, 16)) < 1.5
    assert effective_rank(torch.randn(500, 16)) > 12


def test_embedding_monitor_reports_start_and_epoch_figures() -> None:
    model = tiny_model()
    rng = np.random.default_rng(1)
    labelled = [{"image": torch.as_tensor(rng.random((3, 32, 32), dtype=np.float32)) + (i % 2), "label": i % 2}
                for i in range(12)]
    monitor = EmbeddingMonitor(model.network, DataLoader(labelled, batch_size=6), interval=1, k=3)
    trainer, _ = make_trainer(model, [monitor], max_epochs=1)
    trainer.run()
    metrics = trainer.state.metrics
    assert {"knn_accuracy", "knn_accuracy_at_start", "embedding_std", "effective_rank"} <= set(metrics)
    assert metrics["knn_accuracy"] == 1.0  # the two classes differ by a constant intensity offset

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from scripts.handlers.checkpoint import AtomicCheckpointSaver, ResumeFromLatest, latest_checkpoint
from scripts.handlers.embedding_monitor import (
    EmbeddingMonitor,
    alignment,
    effective_rank,
    knn_accuracy,
    labelled_data_loader,
    second_view,
    spread_subset,
    uniformity,
)
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


def test_alignment_and_uniformity() -> None:
    embeddings = torch.randn(64, 16)
    assert alignment(embeddings, embeddings * 3.0) == pytest.approx(0.0, abs=1e-6)  # same directions
    assert alignment(embeddings, -embeddings) == pytest.approx(4.0, abs=1e-5)
    collapsed = torch.ones(64, 16) + 1e-4 * torch.randn(64, 16)
    assert uniformity(collapsed) == pytest.approx(0.0, abs=1e-3)
    assert uniformity(embeddings) < -1.0  # spread over the sphere
    assert second_view(torch.arange(100.0).reshape(1, 1, 10, 10)).shape == (1, 1, 10, 10)


def test_spread_subset_keeps_every_part_of_the_collection() -> None:
    data = list(range(1000))
    subset = spread_subset(data, 10)
    assert [subset[i] for i in range(len(subset))] == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert spread_subset(data, 5000) is data and spread_subset(data, None) is data
    with pytest.raises(ValueError, match="monitor_samples must be a positive integer or None, got 0"):
        spread_subset(data, 0)


def _images(count: int, labels: list | None, offset: float = 1.0) -> list[dict]:
    rng = np.random.default_rng(1)
    items = []
    for i in range(count):
        item = {"image": torch.as_tensor(rng.random((3, 32, 32), dtype=np.float32)) + offset * (i % 2)}
        if labels is not None:
            item["label"] = labels[i % len(labels)]
        items.append(item)
    return items


def test_monitor_on_unlabelled_own_data_reads_the_knn_set_it_is_given(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model()
    own = DataLoader(_images(12, ["ultrasound"]), batch_size=6)  # one modality: no kNN vote possible on it
    alone = EmbeddingMonitor(model.network, own, k=3, data_name="the pretraining images of /data/mine")
    with caplog.at_level("INFO", logger="scripts.handlers.embedding_monitor"):
        trainer, _ = make_trainer(model, [alone], max_epochs=1)
        trainer.run()
    metrics = trainer.state.metrics
    assert {"embedding_std", "effective_rank", "alignment", "uniformity"} <= set(metrics)
    assert "knn_accuracy" not in metrics and "knn_accuracy_at_start" not in metrics
    assert "on the pretraining images of /data/mine (12 images)" in caplog.text
    assert "no kNN accuracy: the dataset labels of the pretraining images of /data/mine (12 images) hold 1 label(s)" \
        in caplog.text
    assert "labelled split" not in caplog.text

    caplog.clear()
    labelled = DataLoader(_images(10, ["benign", "malignant"]), batch_size=5)
    with_knn = EmbeddingMonitor(model.network, own, k=3, data_name="the pretraining images of /data/mine",
                                knn_loader=labelled, knn_name="the labelled datalist /data/knn.json")
    with caplog.at_level("INFO", logger="scripts.handlers.embedding_monitor"):
        trainer, _ = make_trainer(model, [with_knn], max_epochs=1)
        trainer.run()
    assert trainer.state.metrics["knn_accuracy"] == 1.0  # the two classes differ by a constant offset
    assert "kNN accuracy 1.000 on the labelled datalist /data/knn.json (10 images, 2 classes)" in caplog.text
    assert "kNN accuracy on the labelled datalist /data/knn.json: " in caplog.text


def test_labelled_data_loader_reads_a_classification_datalist(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for k, name in enumerate(["benign", "malignant", "benign", "malignant", "benign", "malignant"]):
        Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(tmp_path / f"{k}.png")
        items.append({"image": f"{k}.png", "label": name})
    datalist = tmp_path / "knn.json"
    datalist.write_text(json.dumps({"classes": ["benign", "malignant"], "training": items[:4],
                                    "validation": items[4:]}))
    batches = list(labelled_data_loader(datalist, image_size=16, batch_size=4))
    assert [tuple(batch["image"].shape) for batch in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert torch.cat([batch["label"] for batch in batches]).tolist() == [0, 1, 0, 1, 0, 1]
    datalist.write_text(json.dumps({"classes": ["benign", "malignant"], "test": items}))
    with pytest.raises(ValueError, match=f"knn_datalist {datalist}: has none of the splits training, validation"):
        labelled_data_loader(datalist, image_size=16)

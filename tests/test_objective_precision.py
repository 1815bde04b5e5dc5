"""The objective as users run it on GPUs: mixed precision, AMP's loss scaling, seeded runs.

MONAI's trainers autocast with ``torch.autocast("cuda")``, which never runs on this CPU-only machine, so
mixed precision is exercised directly with ``torch.autocast("cpu", dtype=torch.bfloat16)``.
"""

from __future__ import annotations

import pytest
import torch

from scripts.networks.projector import ProjectionHead
from scripts.networks.resnet_encoder import ResNet50Encoder
from scripts.networks.ssl_network import LVMMedNetwork
from scripts.objective.geometry import crop_grid
from scripts.objective.lvmmed_loss import LVMMedLoss
from scripts.objective.qap import GraphMatchingSolver
from scripts.pretraining.model import PretrainModel


def two_view_batch(num_images: int, image_size: int = 64) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(num_images, 3, image_size, image_size, generator=generator)
    view2 = base + 0.5 * torch.randn(base.shape, generator=generator)
    corners = torch.rand(num_images, 2, generator=generator) * 0.3
    box1 = torch.cat([corners, corners + 0.7], dim=1)
    box2 = torch.cat([0.3 - corners, 1.0 - corners], dim=1)
    flip1 = torch.rand(num_images, generator=generator) > 0.5
    return base, view2, box1, flip1, box2, ~flip1


def assert_finite_nonzero_gradients(module: torch.nn.Module, name: str) -> None:
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads), f"{name} has parameters without gradient"
    assert all(torch.isfinite(g).all() for g in grads), f"{name} has non-finite gradients"
    assert any(g.abs().sum() > 0 for g in grads), f"{name} received only zero gradients"


def test_pretraining_step_runs_under_bf16_autocast_with_loss_scaling() -> None:
    torch.manual_seed(0)
    network = LVMMedNetwork(ResNet50Encoder(), ProjectionHead(2048, 128))
    model = PretrainModel(network, LVMMedLoss())  # a random network mismatches most views
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(*two_view_batch(18))
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() > 0
    (loss * 2.0**16).backward()  # as GradScaler does
    assert_finite_nonzero_gradients(network.encoder, "encoder")
    assert_finite_nonzero_gradients(network.projector, "projector")
    assert_finite_nonzero_gradients(model.objective.gcn, "GCN")


def test_objective_computes_in_float32_from_half_precision_inputs() -> None:
    torch.manual_seed(0)
    embeddings1 = torch.randn(16, 32).bfloat16().requires_grad_()
    embeddings2 = torch.randn(16, 32).bfloat16()
    features = torch.randn(16, 8, 3, 3).bfloat16()
    grid = crop_grid(torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(16, 1), torch.zeros(16, dtype=torch.bool), (3, 3))
    loss_fn = LVMMedLoss(embedding_dim=32, gcn_features=(32, 32), noise_scale=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(embeddings1, embeddings2, features, features, grid.bfloat16(), grid)
    loss.backward()
    assert loss.dtype == torch.float32
    assert embeddings1.grad.dtype == torch.bfloat16 and embeddings1.grad.abs().sum() > 0


def embedding_gradient(weight: float, lambda_: float = 0.5) -> torch.Tensor:
    torch.manual_seed(0)
    embeddings1 = torch.randn(32, 16, requires_grad=True)
    embeddings2 = (embeddings1.detach() + torch.randn(32, 16)).requires_grad_()
    loss_fn = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16), lambda_=lambda_, local_similarity=False,
                         solver=GraphMatchingSolver(seed=0))
    (weight * loss_fn(embeddings1, embeddings2)).backward()
    return torch.cat([embeddings1.grad.flatten(), embeddings2.grad.flatten()])


def test_gradient_of_a_scaled_loss_is_the_scaled_gradient() -> None:
    """GradScaler multiplies the loss by S and the gradients by 1 / S: IMLE must be linear in the loss weight."""
    plain = embedding_gradient(1.0)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(embedding_gradient(2.0**16), 2.0**16 * plain, rtol=1e-4, atol=1e-6)


def test_losses_repeat_after_the_same_seed() -> None:
    """The solver's random starts follow torch's seed: two objectives built after one seed agree."""
    def losses() -> list[float]:
        torch.manual_seed(7)
        loss_fn = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16), local_similarity=False)
        generator = torch.Generator().manual_seed(3)
        values = []
        for _ in range(3):
            embeddings1 = torch.randn(40, 16, generator=generator)
            values.append(loss_fn(embeddings1, embeddings1 + torch.randn(40, 16, generator=generator)).item())
        return values

    first, second = losses(), losses()
    assert first == second and len(set(first)) > 1


@pytest.mark.parametrize("feature_side,expected_side", [(7, 7), (16, 8), (64, 8)])
def test_auto_local_grid_size_bounds_the_cells_of_large_feature_maps(feature_side: int, expected_side: int) -> None:
    loss_fn = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16))
    features = torch.randn(4, 8, feature_side, feature_side)
    grid = crop_grid(torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(4, 1), torch.zeros(4, dtype=torch.bool),
                     (feature_side, feature_side))
    pooled, pooled_grid = loss_fn._pool(features, grid)
    assert pooled.shape[2:] == (expected_side, expected_side) and pooled_grid.shape[1:3] == (expected_side, expected_side)

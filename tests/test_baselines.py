"""Baseline SSL objectives (SimCLR, VICReg, Barlow Twins) and their selection in configs/pretrain.json."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigWorkflow

from scripts.data.ssl_benchmark import BenchmarkSizes, prepare_ssl_benchmark
from scripts.objective.baselines import BarlowTwinsLoss, SimCLRLoss, VICRegLoss

REPOSITORY = Path(__file__).resolve().parents[1]
BASELINES = {"simclr": SimCLRLoss, "vicreg": VICRegLoss, "barlow_twins": BarlowTwinsLoss}


def _nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent as cross-entropy over the 2N - 1 other views, written independently of MONAI's formulation."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(-float("inf"))
    n = z1.shape[0]
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, partner)


def test_simclr_is_nt_xent() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 16), torch.randn(6, 16)
    for temperature in (0.1, 0.5):
        assert torch.allclose(SimCLRLoss(temperature)(z1, z2), _nt_xent(z1, z2, temperature), atol=1e-5)


def test_simclr_prefers_matching_views() -> None:
    torch.manual_seed(0)
    z1 = torch.randn(8, 16)
    loss = SimCLRLoss()
    assert loss(z1, z1 + 0.05 * torch.randn_like(z1)) < loss(z1, z1[torch.randperm(8)])


def test_vicreg_terms() -> None:
    loss = VICRegLoss()
    collapsed = torch.ones(8, 4)
    # identical constant views: no invariance or covariance cost, the variance hinge is at about 1 per dimension
    assert float(loss(collapsed, collapsed)) == pytest.approx(25.0 * (1 - 1e-2), rel=1e-3)
    torch.manual_seed(0)
    spread = torch.randn(4096, 4) * 2.0
    assert float(loss(spread, spread)) < 0.1  # std above 1, uncorrelated dimensions, identical views
    assert float(loss(spread, spread + 1.0)) == pytest.approx(25.0, rel=0.05)  # invariance: mean squared distance 1


def test_barlow_twins_pushes_cross_correlation_to_identity() -> None:
    torch.manual_seed(0)
    z = torch.randn(2048, 8)
    loss = BarlowTwinsLoss(embedding_dim=8)
    assert float(loss(z, z)) < 0.05  # identical, decorrelated views: C = I up to sampling noise
    assert float(loss(z, torch.randn(2048, 8))) == pytest.approx(8.0, rel=0.05)  # unrelated views: diagonal 0


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_take_the_lvmmed_call_and_give_gradients(name: str) -> None:
    torch.manual_seed(0)
    objective = BASELINES[name](embedding_dim=16) if name == "barlow_twins" else BASELINES[name]()
    embeddings1 = torch.randn(4, 16, requires_grad=True)
    embeddings2 = torch.randn(4, 16, requires_grad=True)
    features, grid = torch.randn(4, 32, 2, 2), torch.rand(4, 2, 2, 2)
    value = objective(embeddings1, embeddings2, features, features, grid, grid)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert embeddings1.grad is not None and embeddings1.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_reject_bad_input(name: str) -> None:
    objective = BASELINES[name](embedding_dim=16) if name == "barlow_twins" else BASELINES[name]()
    with pytest.raises(ValueError, match="differ"):
        objective(torch.randn(4, 16), torch.randn(5, 16))
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        objective(torch.randn(4, 16, 1), torch.randn(4, 16, 1))
    with pytest.raises(ValueError, match="at least 2"):
        objective(torch.randn(1, 16), torch.randn(1, 16))


def test_bad_hyperparameters_are_named() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SimCLRLoss(0.0)
    with pytest.raises(ValueError, match="std_coeff"):
        VICRegLoss(std_coeff=-1.0)
    with pytest.raises(ValueError, match="embedding_dim"):
        BarlowTwinsLoss(embedding_dim=0)
    with pytest.raises(ValueError, match="lambda_offdiag"):
        BarlowTwinsLoss(lambda_offdiag="5e-3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embeddings must have 8"):
        BarlowTwinsLoss(embedding_dim=8)(torch.randn(4, 16), torch.randn(4, 16))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_one_override_selects_each_baseline(name: str) -> None:
    workflow = ConfigWorkflow(config_file=str(REPOSITORY / "configs" / "pretrain.json"), workflow_type=None,
                              logging_file=False, bundle_root=str(REPOSITORY), loss=f"@baseline_objectives#{name}")
    model = workflow.parser.get_parsed_content("model")
    assert isinstance(model.objective, BASELINES[name])
    handlers = workflow.parser.get_parsed_content("train#handlers")
    stats = [handler for handler in handlers if type(handler).__name__ == "ObjectiveStats"]
    assert stats and stats[0].objective is model.objective


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_pretrains_with_every_handler(name: str, tmp_path: Path) -> None:
    """Two iterations of configs/pretrain.json with the baseline: every handler (objective statistics, kNN
    monitor, checkpoints, encoder export) runs, and the objective's statistics are left out of the metrics."""
    paths = prepare_ssl_benchmark(tmp_path / "benchmark", BenchmarkSizes(1, 1, 1, 1))
    export = tmp_path / "encoder.pt"
    workflow = ConfigWorkflow(
        config_file=str(REPOSITORY / "configs" / "pretrain.json"), workflow_type=None, logging_file=False,
        bundle_root=str(REPOSITORY), loss=f"@baseline_objectives#{name}", manifest=str(paths.manifest),
        output_dir=str(tmp_path / "run"), encoder_export_path=str(export), image_size=32, batch_size=4,
        max_epochs=1, **{"train#trainer#epoch_length": 2},
        encoder={"_target_": "scripts.networks.resnet_features.ResNetFeatureEncoder", "model_name": "resnet10"},
    )
    workflow.initialize()
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2
    assert math.isfinite(trainer.state.output["loss"].item())
    assert "knn_accuracy" in trainer.state.metrics and "match_accuracy" not in trainer.state.metrics
    assert export.is_file()


@pytest.mark.slow
def test_baseline_pretrains_through_the_bundle_cli(tmp_path: Path) -> None:
    """``python -m monai.bundle run`` with the one documented override trains Barlow Twins with every handler of
    the config (objective statistics included) and exports the encoder."""
    paths = prepare_ssl_benchmark(tmp_path / "benchmark", BenchmarkSizes(1, 1, 1, 1))
    export = tmp_path / "encoder.pt"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/pretrain.json",
        "--loss", "@baseline_objectives#barlow_twins", "--manifest", str(paths.manifest),
        "--output_dir", str(tmp_path / "run"), "--encoder_export_path", str(export), "--image_size", "32",
        "--batch_size", "4", "--max_epochs", "1", "--train#trainer#epoch_length", "2",
    ]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert export.is_file()
    assert "Traceback" not in result.stderr

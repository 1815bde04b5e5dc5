"""Issue 21's learning-signal fixes: near-duplicates, vertex vs edge scale, a gradient that does not switch off,
the per-path statistics and the benchmark that measures them (benchmarks/learning_signal.py)."""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch
from ignite.engine import Engine

from benchmarks import learning_signal
from scripts.handlers.objective_stats import ObjectiveStats
from scripts.objective.affinity import edge_affinity
from scripts.objective.graph import incidence_rows, knn_edges, pad_edges
from scripts.objective.imle import IMLEState, imle_linear_loss
from scripts.objective.lvmmed_loss import LVMMedLoss
from scripts.objective.qap import QAPBatch, linear_assignment

ABLATIONS = {
    "second_order": {"second_order": False},
    "message_passing": {"message_passing": False},
    "noise": {"noise": "none"},
    "local_similarity": {"local_similarity": False},
}


def _inputs(num_images: int = 8, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    embeddings1 = torch.randn(num_images, dim, generator=generator, requires_grad=True)
    embeddings2 = (embeddings1.detach() + 0.3 * torch.randn(num_images, dim, generator=generator)).requires_grad_(True)
    features1 = torch.randn(num_images, 6, 3, 3, generator=generator, requires_grad=True)
    features2 = torch.randn(num_images, 6, 3, 3, generator=generator, requires_grad=True)
    centres = (torch.arange(3) + 0.5) / 3
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1).expand(num_images, 3, 3, 2)
    return embeddings1, embeddings2, features1, features2, grid, grid


@pytest.mark.parametrize("names", [(), *[(name,) for name in ABLATIONS], tuple(ABLATIONS)])
def test_every_ablation_runs_with_several_imle_samples(names: tuple[str, ...]) -> None:
    """Issue 21 item 4: num_samples > 1 without second order crashed in imle.sample_mean (empty edge tensors)."""
    settings = {key: value for name in names for key, value in ABLATIONS[name].items()}
    torch.manual_seed(0)
    loss_fn = LVMMedLoss(embedding_dim=16, graph_size=4, num_neighbors=2, gcn_features=(16,), num_samples=2, **settings)
    inputs = _inputs()
    loss = loss_fn(*inputs)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(tensor.grad).all() for tensor in inputs[:2])


def _edge_inputs(distance: float, dim: int = 8, nodes: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(2, nodes, dim, generator=generator), dim=-1)
    embeddings[:, 1] = embeddings[:, 0] + distance * torch.nn.functional.normalize(torch.ones(dim), dim=0)
    adjacency = knn_edges(embeddings, 3)
    incidence = incidence_rows(pad_edges(adjacency, 2 * nodes * 3), nodes)
    return embeddings.requires_grad_(True), incidence, adjacency.sum((1, 2), keepdim=True, dtype=embeddings.dtype)


@pytest.mark.parametrize("softening", [0.0, 0.5])
def test_softened_edge_gradient_stays_bounded_for_near_duplicates(softening: float) -> None:
    largest = []
    for distance in (1e-2, 1e-4, 1e-6):
        embeddings, incidence, counts = _edge_inputs(distance)
        pairwise = edge_affinity(embeddings, incidence, softening, counts)
        assert pairwise.abs().max() <= 1.0 + 1e-6
        upstream = torch.randn(pairwise.shape, generator=torch.Generator().manual_seed(1))
        (pairwise * upstream).sum().backward()
        largest.append(float(embeddings.grad.norm(dim=-1).max()))
    if softening == 0:  # the plain cosine: the near-duplicates' gradient grows as 1 / distance
        assert largest[2] > 1e3 * largest[0]
    else:
        assert largest[2] < 1.5 * largest[0]


def test_softened_edge_affinity_matches_autograd_and_keeps_typical_edges() -> None:
    embeddings, incidence, counts = _edge_inputs(0.3)
    embeddings = embeddings.detach().double().requires_grad_(True)

    def reference(nodes: torch.Tensor) -> torch.Tensor:
        vectors = incidence.double() @ nodes
        squared = vectors.square().sum(-1, keepdim=True)
        offset = 0.25 * squared.detach().sum(1, keepdim=True) / counts.double()
        scaled = vectors / (squared + offset).sqrt()
        first, second = scaled.chunk(2)
        return first @ second.transpose(1, 2)

    softened = edge_affinity(embeddings, incidence.double(), 0.5, counts.double())
    torch.testing.assert_close(softened, reference(embeddings))
    upstream = torch.randn(softened.shape, dtype=torch.float64)
    gradient, = torch.autograd.grad((softened * upstream).sum(), embeddings)
    expected, = torch.autograd.grad((reference(embeddings) * upstream).sum(), embeddings)
    torch.testing.assert_close(gradient, expected)
    # the affinity does not change when every embedding is scaled (tau is the graph's own length)
    torch.testing.assert_close(edge_affinity(3.0 * embeddings, incidence.double(), 0.5, counts.double()), softened)
    plain = edge_affinity(embeddings, incidence.double())
    real = plain.abs() > 0
    assert (softened[real].abs() < plain[real].abs()).all()
    with pytest.raises(ValueError, match="edge_counts"):
        edge_affinity(embeddings, incidence.double(), 0.5)


def test_degree_normalisation_divides_the_edge_term_by_the_mean_degree(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def solver(problem: QAPBatch) -> torch.Tensor:
        seen.setdefault("pairwise", []).append(problem.pairwise)
        return linear_assignment(problem.unary)

    results = {}
    for normalisation in ("none", "degree"):
        torch.manual_seed(0)
        loss_fn = LVMMedLoss(embedding_dim=16, graph_size=8, num_neighbors=2, gcn_features=(16,), noise="none",
                             edge_normalisation=normalisation, local_similarity=False, edge_softening=0.0,
                             solver=solver)
        embeddings1, embeddings2 = _inputs()[:2]
        loss_fn(embeddings1, embeddings2)
        results[normalisation] = seen.pop("pairwise")[0][0]  # first graph of the forward call (perturbed problem)
    adjacency = knn_edges(torch.stack([embeddings1.detach(), embeddings2.detach()]), 2)
    mean_degree = float(adjacency.sum()) / (2 * 8)
    torch.testing.assert_close(results["degree"], results["none"] / mean_degree)
    assert 2.0 <= mean_degree <= 4.0


def test_relative_noise_follows_the_spread_of_the_affinities() -> None:
    """With noise_reference="spread", scaling every affinity by c leaves the perturbed matching unchanged (the noise
    scales with them); with a fixed scale, large affinities drown the noise."""
    generator = torch.Generator().manual_seed(0)
    unary = 0.1 * torch.randn(64, 6, 6, generator=generator)
    empty_edges = torch.zeros(64, 0, 2, dtype=torch.long)
    matchings = {}
    for reference, scale in product(("spread", "absolute"), (1.0, 100.0)):
        problem = QAPBatch(unary=scale * unary, edges1=empty_edges, edges2=empty_edges, pairwise=torch.zeros(64, 0, 0))
        torch.manual_seed(1)
        state = IMLEState()
        imle_linear_loss(problem, lambda p: linear_assignment(p.unary), torch.ones(6, 6).fill_diagonal_(-1.0), 3.0,
                         noise_scale=1.0, noise_reference=reference, state=state)
        matchings[reference, scale] = state.matching
    assert torch.equal(matchings["spread", 1.0], matchings["spread", 100.0])
    assert not torch.equal(matchings["absolute", 1.0], matchings["absolute", 100.0])
    with pytest.raises(ValueError, match="noise_reference"):
        LVMMedLoss(noise_reference="relative")


def test_gradient_paths_are_recorded_only_when_asked() -> None:
    torch.manual_seed(0)
    loss_fn = LVMMedLoss(embedding_dim=16, graph_size=8, num_neighbors=2, gcn_features=(16,), noise_scale=5.0)
    loss_fn(*_inputs()).backward()
    assert all(math.isnan(float(norm)) for norm in loss_fn.last_gradient_norms.values())
    loss_fn.track_gradient_paths = True
    inputs = _inputs()
    loss_fn(*inputs).backward()
    norms = {path: float(norm) for path, norm in loss_fn.last_gradient_norms.items()}
    assert set(norms) == {"vertex", "edge", "local"} and all(value > 0 for value in norms.values())
    # the local path is the only one that reaches the feature maps
    local = math.sqrt(sum(float(tensor.grad.square().sum()) for tensor in inputs[2:4]))
    assert norms["local"] == pytest.approx(local, rel=1e-5)
    assert float(loss_fn.last_gradient_is_zero) == 0.0


def test_objective_stats_publish_the_signal_per_epoch() -> None:
    torch.manual_seed(0)
    loss_fn = LVMMedLoss(embedding_dim=16, graph_size=8, num_neighbors=2, gcn_features=(16,), noise_scale=5.0)
    tracked = []

    def step(engine: Engine, _: object) -> None:
        tracked.append(loss_fn.track_gradient_paths)
        loss_fn(*_inputs(seed=engine.state.iteration)).backward()

    engine = Engine(step)
    ObjectiveStats(loss_fn, gradient_interval=2).attach(engine)
    engine.run(range(4), max_epochs=1)
    assert tracked == [True, False, True, False]
    metrics = engine.state.metrics
    assert 0.0 <= metrics["zero_gradient_step_share"] <= 1.0
    for path in ("vertex", "edge", "local"):
        assert metrics[f"gradient_norm_{path}"] > 0
    assert metrics["gradient_norm_edge_to_vertex"] == pytest.approx(
        metrics["gradient_norm_edge"] / metrics["gradient_norm_vertex"])
    with pytest.raises(ValueError, match="gradient_interval"):
        ObjectiveStats(loss_fn, gradient_interval=0)


def test_parse_setting_reads_json_values() -> None:
    assert learning_signal.parse_setting("edge_weight=0.5,noise=none,second_order=false") == {
        "edge_weight": 0.5, "noise": "none", "second_order": False}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        learning_signal.parse_setting("edge_weight")


def test_quick_learning_signal_shows_the_fixes(capsys: pytest.CaptureFixture[str]) -> None:
    results = learning_signal.run({"defaults": {}, "before": dict(learning_signal.BEFORE_ISSUE_21),
                                   "fixes": dict(learning_signal.ALL_FIXES)}, quick=True)
    for name in ("defaults", "before", "fixes"):
        assert set(results[name]["path_ratio"]) == {"mixed", "slices", "local_mixed"}
        assert 0.0 <= results[name]["free_embeddings"]["zero_gradient_share"] <= 1.0
    # the measured fixes: bounded near-duplicate gradients, the edge term brought to the vertex term's scale
    before, after = results["before"]["near_duplicate_growth"], results["defaults"]["near_duplicate_growth"]
    assert before[1e-6] > 1e4 and after[1e-6] < 10
    assert results["fixes"]["path_ratio"]["mixed"] < results["before"]["path_ratio"]["mixed"]
    assert math.isnan(results["NT-Xent"]["free_embeddings"]["zero_gradient_share"])
    learning_signal.main(["--quick", "--compare", "second_order=false"])
    assert "second_order=false" in capsys.readouterr().out

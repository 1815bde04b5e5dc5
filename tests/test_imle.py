from __future__ import annotations

import pytest
import torch

from scripts.objective.graph import knn_edges, pad_edges
from scripts.objective.hamming import hamming_distance
from scripts.objective.imle import imle_match
from scripts.objective.qap import GraphMatchingSolver, QAPBatch, edge_matches, linear_assignment


def random_problem(num_graphs: int, num_nodes: int, requires_grad: bool = True) -> QAPBatch:
    adjacency = knn_edges(torch.randn(num_graphs, num_nodes, 4), k=2)
    edges = pad_edges(adjacency)
    unary = torch.randn(num_graphs, num_nodes, num_nodes, requires_grad=requires_grad)
    pairwise = (0.1 * torch.randn(num_graphs, edges.shape[1], edges.shape[1])).requires_grad_(requires_grad)
    return QAPBatch(unary=unary, edges1=edges, edges2=edges, pairwise=pairwise)


def test_hamming_distance_counts_differing_entries_and_is_linear() -> None:
    identity = torch.eye(4)[None]
    swapped = identity[:, [1, 0, 2, 3]]
    assert hamming_distance(torch.cat([identity, swapped])).tolist() == [0.0, 4.0]
    torch.testing.assert_close(hamming_distance(0.5 * (identity + swapped)), torch.tensor([2.0]))
    with pytest.raises(ValueError, match=r"\(B, n, n\), got \(4, 3\)"):
        hamming_distance(torch.zeros(4, 3))


def test_forward_returns_the_solvers_matching_without_noise() -> None:
    problem = random_problem(3, 6)
    solver = GraphMatchingSolver()
    matching = imle_match(problem, solver, step=10.0, noise="none")
    assert torch.equal(matching, solver(problem))


def test_backward_is_the_finite_difference_of_two_solutions() -> None:
    problem = random_problem(2, 5)
    solver = GraphMatchingSolver()
    step = 3.0
    matching = imle_match(problem, solver, step=step, noise="none")
    upstream = torch.randn_like(matching)
    matching.backward(upstream)
    target_problem = QAPBatch(problem.unary.detach() - step * upstream, problem.edges1, problem.edges2, problem.pairwise.detach())
    target = solver(target_problem)
    torch.testing.assert_close(problem.unary.grad, (matching.detach() - target) / step)
    expected_pairwise = (edge_matches(problem, matching.detach()) - edge_matches(problem, target)) / step
    torch.testing.assert_close(problem.pairwise.grad, expected_pairwise)


def test_gumbel_noise_perturbs_and_samples_average() -> None:
    problem = random_problem(4, 6, requires_grad=False)
    flat = QAPBatch(torch.zeros_like(problem.unary), problem.edges1, problem.edges2, torch.zeros_like(problem.pairwise))
    solver = GraphMatchingSolver()
    draws = {tuple(imle_match(flat, solver, step=1.0).argmax(-1).flatten().tolist()) for _ in range(5)}
    assert len(draws) > 1  # ties broken differently by the noise
    averaged = imle_match(flat, solver, step=1.0, num_samples=8)
    torch.testing.assert_close(averaged.sum(-1), torch.ones(4, 6))
    assert ((averaged > 0) & (averaged < 1)).any()


@pytest.mark.parametrize("kwargs,message", [
    ({"step": 0.0}, "step"), ({"step": 1.0, "noise": "normal"}, "noise"),
    ({"step": 1.0, "noise_scale": 0.0}, "noise_scale"), ({"step": 1.0, "num_samples": 0}, "num_samples"),
])
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        imle_match(random_problem(1, 3), GraphMatchingSolver(), **kwargs)


def train_toy_problem(use_gradient: bool, second_order: bool, steps: int = 200) -> tuple[float, float]:
    """Learnable affinities of 8 random 12-node problems, trained to match vertex i with vertex i."""
    torch.manual_seed(0)
    problem = random_problem(8, 12)
    unary = torch.nn.Parameter(problem.unary.detach().clone())
    pairwise = torch.nn.Parameter(problem.pairwise.detach().clone())
    optimizer = torch.optim.Adam([unary, pairwise], lr=0.05)
    solver = GraphMatchingSolver() if second_order else (lambda p: linear_assignment(p.unary))
    losses = []
    for _ in range(steps):
        current = QAPBatch(unary, problem.edges1, problem.edges2, pairwise)
        loss = hamming_distance(imle_match(current, solver, step=80.0 * 8)).mean()
        optimizer.zero_grad()
        if use_gradient:
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[:10]) / 10, sum(losses[-10:]) / 10


@pytest.mark.parametrize("second_order", [True, False])
def test_imle_gradient_drives_the_hamming_loss_to_zero(second_order: bool) -> None:
    start, end = train_toy_problem(use_gradient=True, second_order=second_order)
    assert start > 10.0
    assert end < 0.5
    frozen_start, frozen_end = train_toy_problem(use_gradient=False, second_order=second_order, steps=60)
    assert frozen_end > 10.0 and abs(frozen_end - frozen_start) < 3.0

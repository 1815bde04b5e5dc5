from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scripts.objective.affinity import edge_affinity, global_affinity, local_affinity, unit_vectors
from scripts.objective.geometry import crop_grid, grid_box, inside_box, nearest_location, pool_grid
from scripts.objective.graph import incidence_rows
from scripts.objective.qap import edge_selection


def test_crop_grid_maps_cells_to_original_coordinates_with_flip() -> None:
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.4, 0.6, 0.8]])
    grid = crop_grid(boxes, torch.tensor([False, True]), (2, 4))
    assert grid.shape == (2, 2, 4, 2)
    torch.testing.assert_close(grid[0, :, 0, 0], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(grid[0, 0, :, 1], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    # flipped: the first column of the view is the right-most part of the crop
    torch.testing.assert_close(grid[1, 0, :, 1], torch.tensor([0.75, 0.65, 0.55, 0.45]))
    torch.testing.assert_close(grid[1, :, 0, 0], torch.tensor([0.3, 0.5]))
    torch.testing.assert_close(pool_grid(grid, 1)[:, 0, 0], torch.tensor([[0.5, 0.5], [0.4, 0.6]]))


def test_nearest_location_follows_the_flip() -> None:
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    plain = crop_grid(boxes, torch.tensor([False]), (3, 3)).flatten(1, 2)
    flipped = crop_grid(boxes, torch.tensor([True]), (3, 3)).flatten(1, 2)
    index = nearest_location(plain, flipped)[0, 0]
    # cell (r, s) of the plain view is cell (r, 2 - s) of the flipped one
    assert index.tolist() == [r * 3 + (2 - s) for r in range(3) for s in range(3)]


def naive_local_affinity(f1: torch.Tensor, f2: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Eq. 2 written as loops over views and cells; features (n, P, D)."""
    n = f1.shape[0]
    out = torch.zeros(n, n)
    for i in range(n):
        for a in range(n):
            location, feature = [], []
            for p in range(f1.shape[1]):
                q_loc = int(((g2[a] - g1[i, p]) ** 2).sum(-1).argmin())
                q_feat = int(((f2[a] - f1[i, p]) ** 2).sum(-1).argmin())
                location.append(F.cosine_similarity(f1[i, p], f2[a, q_loc], dim=0))
                feature.append(F.cosine_similarity(f1[i, p], f2[a, q_feat], dim=0))
            out[i, a] = 0.5 * (torch.stack(location).mean() + torch.stack(feature).mean())
    return out


def test_local_affinity_matches_the_loop_definition_of_eq2() -> None:
    features1, features2 = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 9, 8)
    boxes1, boxes2 = torch.rand(8, 2) * 0.4, torch.rand(8, 2) * 0.4
    grid1 = crop_grid(torch.cat([boxes1, boxes1 + 0.5], 1), torch.rand(8) > 0.5, (2, 3)).reshape(2, 4, 6, 2)
    grid2 = crop_grid(torch.cat([boxes2, boxes2 + 0.6], 1), torch.rand(8) > 0.5, (3, 3)).reshape(2, 4, 9, 2)
    result = local_affinity(features1.transpose(2, 3), features2.transpose(2, 3), grid1, grid2)
    for g in range(2):
        torch.testing.assert_close(result[g], naive_local_affinity(features1[g], features2[g], grid1[g], grid2[g]))


def test_local_affinity_is_one_for_the_same_view_and_flows_gradients() -> None:
    features = torch.randn(1, 3, 5, 4, requires_grad=True)
    grid = crop_grid(torch.rand(3, 2).repeat(1, 2) * torch.tensor([0.5, 0.5, 1, 1]) + torch.tensor([0, 0, 0.5, 0.5]),
                     torch.tensor([False, True, False]), (2, 2)).reshape(1, 3, 4, 2)
    result = local_affinity(features, features, grid, grid)
    torch.testing.assert_close(result[0].diagonal(), torch.ones(3))
    assert (result[0] <= 1 + 1e-6).all()
    result.sum().backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()


def test_global_and_edge_affinities_are_cosines_and_padding_is_zero() -> None:
    nodes1, nodes2 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    nodes = torch.cat([nodes1, nodes2])
    glob = global_affinity(nodes)
    torch.testing.assert_close(glob[1, 2, 4], F.cosine_similarity(nodes1[1, 2], nodes2[1, 4], dim=0))
    edges1 = torch.tensor([[[0, 1], [2, 3], [0, 0]], [[4, 1], [1, 4], [3, 2]]])
    edges2 = torch.tensor([[[1, 2], [0, 0], [0, 0]], [[0, 3], [2, 1], [0, 0]]])
    edges = torch.cat([edges1, edges2])
    incidence = incidence_rows(edges, 5)
    # target rows minus source rows of the edge selection, which the solver's edge matches use
    torch.testing.assert_close(incidence, edge_selection(edges, 5).diff(dim=1).squeeze(1))
    pairwise = edge_affinity(nodes, incidence)
    assert pairwise.shape == (2, 3, 3)
    expected = F.cosine_similarity(nodes1[1, 1] - nodes1[1, 4], nodes2[1, 1] - nodes2[1, 2], dim=0)
    torch.testing.assert_close(pairwise[1, 0, 1], expected)
    assert pairwise[0, 2].abs().max() == 0 and pairwise[0, :, 1:].abs().max() == 0
    with pytest.raises(ValueError, match=r"nodes must have shape \(2G, n, F\), got \(3, 5, 3\)"):
        global_affinity(torch.randn(3, 5, 3))


def test_centred_global_affinity_ignores_each_graphs_common_component() -> None:
    nodes = torch.randn(4, 6, 8, dtype=torch.float64)
    # a different common vector added to every vertex of each graph (view 1's two graphs, then view 2's)
    shifted = nodes + 5.0 * torch.randn(4, 1, 8, dtype=torch.float64)
    torch.testing.assert_close(global_affinity(shifted, centred=True), global_affinity(nodes, centred=True))
    assert (global_affinity(shifted) - global_affinity(nodes)).abs().max() > 0.1
    centred = nodes - nodes.mean(1, keepdim=True)
    torch.testing.assert_close(global_affinity(nodes, centred=True)[1, 2, 4],
                               F.cosine_similarity(centred[1, 2], centred[3, 4], dim=0))


def test_unit_vectors_match_f_normalize_with_gradients() -> None:
    vectors = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 4, 6, dtype=torch.float64)
    for dim in (-1, 1):
        unit, norm = unit_vectors(vectors, dim)
        torch.testing.assert_close(unit, F.normalize(vectors, dim=dim))
        torch.testing.assert_close(norm, vectors.norm(dim=dim, keepdim=True))
        ours = torch.autograd.grad((unit * weights).sum(), vectors)[0]
        reference = torch.autograd.grad((F.normalize(vectors, dim=dim) * weights).sum(), vectors)[0]
        torch.testing.assert_close(ours, reference)


def autograd_local_affinity(f1, f2, g1, g2, box2, num_matches):
    """The local affinity with autograd through every step, features (G, n, D, P), as the reference of the
    hand-written backward."""
    u1, u2 = F.normalize(f1, dim=2), F.normalize(f2, dim=2)
    cosines = torch.einsum("gidp,gadq->giapq", u1, u2)
    dots = torch.einsum("gidp,gadq->giapq", f1, f2)
    squared = f1.norm(dim=2)[:, :, None, :, None] ** 2 + f2.norm(dim=2)[:, None, :, None, :] ** 2 - 2 * dots
    by_feature = squared.argmin(-1)
    by_location = nearest_location(g1, g2)
    location = cosines.gather(-1, by_location[..., None]).squeeze(-1)
    feature = cosines.gather(-1, by_feature[..., None]).squeeze(-1)
    location = location.masked_fill(~inside_box(g1, box2), -torch.inf)

    def mean_of_best(values):
        values = values.topk(min(num_matches, values.shape[-1]), dim=-1).values
        kept = torch.isfinite(values)
        return torch.where(kept, values, 0.0).sum(-1) / kept.sum(-1).clamp_min(1)

    return 0.5 * (mean_of_best(location) + mean_of_best(feature))


@pytest.mark.parametrize("num_matches", [3, 100])
def test_the_hand_written_local_backward_equals_autograd(num_matches: int) -> None:
    torch.manual_seed(0)
    f1 = torch.randn(2, 4, 6, 9, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(2, 4, 6, 9, dtype=torch.float64, requires_grad=True)
    corners = torch.rand(16, 2, dtype=torch.float64) * 0.5
    boxes = torch.cat([corners, corners + 0.5], 1)
    grids = crop_grid(boxes, torch.rand(16) > 0.5, (3, 3))
    g1, g2 = grids[:8].reshape(2, 4, 9, 2), grids[8:].reshape(2, 4, 9, 2)
    box2 = grid_box(grids[8:]).reshape(2, 4, 4)
    weights = torch.randn(2, 4, 4, dtype=torch.float64)
    ours = local_affinity(f1, f2, g1, g2, box2, num_matches)
    reference = autograd_local_affinity(f1, f2, g1, g2, box2, num_matches)
    torch.testing.assert_close(ours, reference)
    grads = torch.autograd.grad((ours * weights).sum(), (f1, f2))
    expected = torch.autograd.grad((reference * weights).sum(), (f1, f2))
    for got, want in zip(grads, expected):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda a, b: local_affinity(a, b, g1, g2, box2, num_matches), (f1, f2))

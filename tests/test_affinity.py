from __future__ import annotations

import torch
import torch.nn.functional as F

from scripts.objective.affinity import edge_affinity, global_affinity, local_affinity
from scripts.objective.geometry import crop_grid, nearest_location, pool_grid


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
    """Eq. 2 written as loops over views and cells."""
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
    result = local_affinity(features1, features2, grid1, grid2)
    for g in range(2):
        torch.testing.assert_close(result[g], naive_local_affinity(features1[g], features2[g], grid1[g], grid2[g]))


def test_local_affinity_is_one_for_the_same_view_and_flows_gradients() -> None:
    features = torch.randn(1, 3, 4, 5, requires_grad=True)
    grid = crop_grid(torch.rand(3, 2).repeat(1, 2) * torch.tensor([0.5, 0.5, 1, 1]) + torch.tensor([0, 0, 0.5, 0.5]),
                     torch.tensor([False, True, False]), (2, 2)).reshape(1, 3, 4, 2)
    result = local_affinity(features, features, grid, grid)
    torch.testing.assert_close(result[0].diagonal(), torch.ones(3))
    assert (result[0] <= 1 + 1e-6).all()
    result.sum().backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()


def test_global_and_edge_affinities_are_cosines_and_padding_is_zero() -> None:
    nodes1, nodes2 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    glob = global_affinity(nodes1, nodes2)
    torch.testing.assert_close(glob[1, 2, 4], F.cosine_similarity(nodes1[1, 2], nodes2[1, 4], dim=0))
    edges1 = torch.tensor([[[0, 1], [2, 3], [0, 0]], [[4, 1], [1, 4], [3, 2]]])
    edges2 = torch.tensor([[[1, 2], [0, 0]], [[0, 3], [2, 1]]])
    pairwise = edge_affinity(nodes1, edges1, nodes2, edges2)
    assert pairwise.shape == (2, 3, 2)
    expected = F.cosine_similarity(nodes1[1, 1] - nodes1[1, 4], nodes2[1, 1] - nodes2[1, 2], dim=0)
    torch.testing.assert_close(pairwise[1, 0, 1], expected)
    assert pairwise[0, 2].abs().max() == 0 and pairwise[0, :, 1].abs().max() == 0

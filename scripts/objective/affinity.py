"""Vertex and edge affinities between the graphs of two views (LVM-Med Eqs. 2-3, section 3.2.3).

All functions work on G graphs at once: graph g of view 1 holds the first views of n images and
graph g of view 2 the second views of the same n images, in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scripts.objective.geometry import inside_box, nearest_location

__all__ = ["global_affinity", "local_affinity", "edge_affinity"]


def global_affinity(nodes1: torch.Tensor, nodes2: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every vertex of graph 1 and every vertex of graph 2.

    Args:
        nodes1: (G, n, F) vertex embeddings of view 1 (after message passing).
        nodes2: (G, n, F) vertex embeddings of view 2.

    Returns:
        (G, n, n) affinities in [-1, 1].
    """
    return F.normalize(nodes1, dim=-1) @ F.normalize(nodes2, dim=-1).transpose(1, 2)


def local_affinity(
    features1: torch.Tensor,
    features2: torch.Tensor,
    grid1: torch.Tensor,
    grid2: torch.Tensor,
    box2: torch.Tensor | None = None,
    num_matches: int | None = None,
) -> torch.Tensor:
    """Location- and feature-based local affinity of LVM-Med (Eq. 2 and appendix A's ``local_cost``).

    For views i (of graph 1) and a (of graph 2), every cell p of i's feature map is compared by cosine
    similarity with (1) the cell of a whose centre is closest to p's in original-image coordinates and
    (2) the cell of a whose feature vector is closest to p's in L2 distance. Appendix A keeps the best
    matches ("gamma: maximum pairs are kept, select_top"): each term averages the ``num_matches``
    highest cosines over p, and the location term only counts cells p that lie inside view a's crop
    (elsewhere the closest cell of a shows other content). The two terms are averaged; a term with no
    cell to count is 0.

    Args:
        features1: (G, n, P, D) feature vectors of the P = R x S cells of view-1 feature maps.
        features2: (G, n, Q, D) same for view 2.
        grid1: (G, n, P, 2) cell centres of view 1 in its original image (see ``crop_grid``).
        grid2: (G, n, Q, 2) same for view 2.
        box2: (G, n, 4) crop boxes (y0, x0, y1, x1) of the view-2 feature maps in their original images
            (see ``grid_box``); None counts every cell in the location term.
        num_matches: gamma, the number of best cells kept per term (None or >= P: all).

    Returns:
        (G, n, n) affinities in [-1, 1].
    """
    if num_matches is not None and num_matches < 1:
        raise ValueError(f"num_matches must be positive or None, got {num_matches}.")
    # one product gives both the cosines and the L2 distances used to pick feature neighbours
    dots = torch.einsum("gipd,gaqd->giapq", features1, features2)
    norms1 = features1.norm(dim=-1)  # (G, n, P)
    norms2 = features2.norm(dim=-1)  # (G, n, Q)
    outer = norms1[:, :, None, :, None] * norms2[:, None, :, None, :]
    cosines = dots / outer.clamp_min(1e-8)
    with torch.no_grad():
        squared_distance = norms1[:, :, None, :, None] ** 2 + norms2[:, None, :, None, :] ** 2 - 2 * dots
        by_feature = squared_distance.argmin(dim=-1)  # (G, n, n, P)
        by_location = nearest_location(grid1, grid2)
        inside = None if box2 is None else inside_box(grid1, box2)  # (G, n, n, P)
    location_cost = _mean_of_best(cosines.gather(-1, by_location[..., None]).squeeze(-1), inside, num_matches)
    feature_cost = _mean_of_best(cosines.gather(-1, by_feature[..., None]).squeeze(-1), None, num_matches)
    return 0.5 * (location_cost + feature_cost)


def _mean_of_best(values: torch.Tensor, valid: torch.Tensor | None, count: int | None) -> torch.Tensor:
    """Mean of the ``count`` largest valid entries along the last axis (all when None); 0 where none is valid."""
    cells = values.shape[-1]
    if valid is None and (count is None or count >= cells):
        return values.mean(-1)
    if valid is not None:
        values = values.masked_fill(~valid, -torch.inf)
    if count is not None and count < cells:
        values = values.topk(count, dim=-1).values
    kept = torch.isfinite(values)
    return torch.where(kept, values, 0.0).sum(-1) / kept.sum(-1).clamp_min(1)


def edge_affinity(nodes1: torch.Tensor, edges1: torch.Tensor, nodes2: torch.Tensor, edges2: torch.Tensor) -> torch.Tensor:
    """Second-order affinity: cosine similarity of the edge vectors ``h_j - h_i`` of the two graphs.

    Padding edges (0, 0) have a zero vector and thus zero affinity with every edge.

    Args:
        nodes1: (G, n, F) vertex embeddings of view 1.
        edges1: (G, E1, 2) directed edges (i, j) of graph 1.
        nodes2: (G, n, F) vertex embeddings of view 2.
        edges2: (G, E2, 2) directed edges (a, b) of graph 2.

    Returns:
        (G, E1, E2) affinities in [-1, 1].
    """
    vectors1 = _edge_vectors(nodes1, edges1)
    vectors2 = _edge_vectors(nodes2, edges2)
    return F.normalize(vectors1, dim=-1) @ F.normalize(vectors2, dim=-1).transpose(1, 2)


def _edge_vectors(nodes: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """(G, E, F) difference between target and source embeddings of every edge."""
    target = nodes.gather(1, edges[..., 1:2].expand(-1, -1, nodes.shape[-1]))
    source = nodes.gather(1, edges[..., 0:1].expand(-1, -1, nodes.shape[-1]))
    return target - source

"""Vertex and edge affinities between the graphs of two views (LVM-Med Eqs. 2-3, section 3.2.3).

All functions work on G graphs at once: graph g of view 1 holds the first views of n images and
graph g of view 2 the second views of the same n images, in the same order. The two views travel
stacked on the leading (graph) axis where they share a shape, view 1's G graphs then view 2's, so that one
operator call serves both (each call is a kernel launch on CUDA: see ``benchmarks/objective_profile.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from scripts.objective.geometry import inside_box, nearest_location

__all__ = ["unit_vectors", "global_affinity", "local_affinity", "edge_affinity"]

_NORM_EPS = 1e-12  # F.normalize's: a zero vector stays zero


class _UnitVectors(torch.autograd.Function):
    """x / max(|x|, eps) along one axis, and |x|, with a hand-written backward.

    Written by hand because F.normalize's autograd takes 18 operator calls per use (forward and
    backward), this 9: the objective normalises embeddings, edge vectors and feature-map cells every step.
    """

    @staticmethod
    def forward(ctx: Any, vectors: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        norm, inverse = _norm_and_inverse(vectors, dim)
        unit = vectors * inverse
        ctx.save_for_backward(unit, inverse)
        ctx.dim = dim
        ctx.mark_non_differentiable(norm)
        ctx.set_materialize_grads(False)
        return unit, norm

    @staticmethod
    def backward(ctx: Any, grad_unit: torch.Tensor | None, _: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        if grad_unit is None:
            return None, None
        unit, inverse = ctx.saved_tensors
        return _unit_backward(grad_unit, unit, inverse, ctx.dim), None


def unit_vectors(vectors: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised vectors along ``dim`` (as ``F.normalize``) and their norms (keepdim, no gradient)."""
    return _UnitVectors.apply(vectors, dim)


class _SoftenedUnitVectors(torch.autograd.Function):
    """x / sqrt(|x|^2 + tau^2) for (B, M, F) vectors, tau^2 = s^2 * (sum of |x|^2 over the batch entry) / count,
    with a hand-written backward: (g - u <g, u>) / sqrt(|x|^2 + tau^2) for u the result and tau held constant
    (the same form as the unit vectors' backward). Written by hand for the same reason as ``_UnitVectors``."""

    @staticmethod
    def forward(ctx: Any, vectors: torch.Tensor, softening: float, counts: torch.Tensor) -> torch.Tensor:
        squared = vectors.square().sum(-1, keepdim=True)  # (B, M, 1)
        offset = squared.sum(1, keepdim=True).div_(counts).mul_(softening**2)  # (B, 1, 1)
        # the eps keeps an all-zero batch entry (every embedding equal) at zero rather than 0 / 0
        inverse = squared.add_(offset).clamp_min_(_NORM_EPS**2).rsqrt_()
        scaled = vectors * inverse
        ctx.save_for_backward(scaled, inverse)
        return scaled

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        scaled, inverse = ctx.saved_tensors
        return _unit_backward(grad, scaled, inverse, -1), None, None


def global_affinity(nodes: torch.Tensor, centred: bool = False) -> torch.Tensor:
    """Cosine similarity between every vertex of graph 1 and every vertex of graph 2.

    With ``centred`` each graph's mean vertex is subtracted first: the cosine of each vertex's deviation from its
    graph's mean, as a batch normalisation without scale would give per view. The plain cosine sees the
    embeddings' common component: when all embeddings lie within an angle s of their mean, every cosine is
    1 - O(s^2) and its gradient is O(s), while the edge affinities (``edge_affinity``) compare differences of
    vertices, which no common component reaches, with a gradient of O(1 / s): the vertex term fades as the
    embeddings concentrate. Centred, both terms see each graph up to a translation and both gradients scale as
    1 / s.

    Args:
        nodes: (2G, n, F) vertex embeddings (after message passing): view 1's G graphs, then view 2's.
        centred: subtract each graph's mean vertex before the cosines.

    Returns:
        (G, n, n) affinities in [-1, 1].
    """
    if nodes.ndim != 3 or nodes.shape[0] % 2:
        raise ValueError(f"nodes must have shape (2G, n, F), got {tuple(nodes.shape)}.")
    if centred:
        nodes = nodes - nodes.mean(1, keepdim=True)
    unit1, unit2 = unit_vectors(nodes)[0].chunk(2)
    return torch.bmm(unit1, unit2.transpose(1, 2))


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
        features1: (G, n, D, P) feature vectors (channels first, as feature maps are) of the P = R x S
            cells of view-1 feature maps.
        features2: (G, n, D, Q) same for view 2.
        grid1: (G, n, P, 2) cell centres of view 1 in its original image (see ``crop_grid``).
        grid2: (G, n, Q, 2) same for view 2.
        box2: (G, n, 4) crop boxes (y0, x0, y1, x1) of the view-2 feature maps in their original images
            (see ``grid_box``); None counts every cell in the location term.
        num_matches: gamma, the number of best cells kept per term (None or >= P: all).

    Returns:
        (G, n, n) affinities in [-1, 1], differentiable with respect to the features.
    """
    if num_matches is not None and num_matches < 1:
        raise ValueError(f"num_matches must be positive or None, got {num_matches}.")
    if features1.ndim != 4 or features2.shape[:3] != features1.shape[:3]:
        raise ValueError(
            f"features must be (G, n, D, P) and (G, n, D, Q), got {tuple(features1.shape)} and {tuple(features2.shape)}."
        )
    return _LocalAffinity.apply(features1, features2, grid1, grid2, box2, num_matches)


class _LocalAffinity(torch.autograd.Function):
    """``local_affinity`` with a hand-written backward.

    Written by hand because autograd replays the forward's selections (gathers, masks, top-k, means) and the
    cosines' normalisation and product as about 40 operator calls (kernel launches on CUDA); the gradient of
    a mean of selected cosines is one scatter into the cosine tensor, two products and the normalisation's
    backward: about 20. ``tests/test_affinity.py`` checks it against autograd.
    """

    @staticmethod
    def forward(
        ctx: Any,
        features1: torch.Tensor,
        features2: torch.Tensor,
        grid1: torch.Tensor,
        grid2: torch.Tensor,
        box2: torch.Tensor | None,
        num_matches: int | None,
    ) -> torch.Tensor:
        num_graphs, num_nodes, _, cells = features1.shape
        norm1, inverse1 = _norm_and_inverse(features1, dim=2)  # (G, n, 1, P)
        norm2, inverse2 = _norm_and_inverse(features2, dim=2)
        unit1, unit2 = features1 * inverse1, features2 * inverse2
        cosines = torch.einsum("gidp,gadq->giapq", unit1, unit2)  # (G, n, n, P, Q)
        # the L2-closest cell q of p: argmin |f_q|^2 - 2 <f_p, f_q> = argmax |f_q| (2 |f_p| cos_pq - |f_q|)
        norm1, norm2 = norm1.unsqueeze(-1), norm2.view(num_graphs, 1, num_nodes, 1, -1)
        by_feature = (cosines * norm1).mul_(2).sub_(norm2).mul_(norm2).argmax(-1)  # (G, n, n, P)
        closest = torch.stack([nearest_location(grid1, grid2), by_feature], dim=-1)  # (G, n, n, P, 2)
        terms = cosines.gather(-1, closest)  # (G, n, n, P, 2): location, feature
        if box2 is not None:
            outside = inside_box(grid1, box2).logical_not_()
            terms.masked_fill_(torch.stack([outside, torch.zeros_like(outside)], -1), -torch.inf)
        terms = terms.transpose(-1, -2)  # (G, n, n, 2, P)
        best = None
        if num_matches is not None and num_matches < cells:
            terms, best = terms.topk(num_matches, dim=-1)
        kept = terms.isfinite()
        # each term's weight in the result: 1/2 per term, over the cells it counts
        weight = kept.sum(-1, keepdim=True).clamp_min(1).reciprocal().mul_(0.5)  # (G, n, n, 2, 1)
        ctx.save_for_backward(unit1, unit2, inverse1, inverse2, closest, kept, weight, best)
        ctx.cell_counts = (cells, features2.shape[-1])
        return (terms.where(kept, 0.0) * weight).sum((-1, -2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None, None]:
        unit1, unit2, inverse1, inverse2, closest, kept, weight, best = ctx.saved_tensors
        cells1, cells2 = ctx.cell_counts
        grad_terms = (grad[..., None, None] * weight) * kept  # (G, n, n, 2, P or gamma)
        if best is not None:
            grad_terms = grad_terms.new_zeros((*grad_terms.shape[:-1], cells1)).scatter_(-1, best, grad_terms)
        grad_cosines = grad_terms.new_zeros((*closest.shape[:-1], cells2)).scatter_add_(
            -1, closest, grad_terms.transpose(-1, -2))  # (G, n, n, P, Q)
        grad_unit1 = torch.einsum("giapq,gadq->gidp", grad_cosines, unit2)
        grad_unit2 = torch.einsum("giapq,gidp->gadq", grad_cosines, unit1)
        return (_unit_backward(grad_unit1, unit1, inverse1, 2), _unit_backward(grad_unit2, unit2, inverse2, 2),
                None, None, None, None)


def _norm_and_inverse(vectors: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """|x| and 1 / max(|x|, eps) along ``dim`` (keepdim), as F.normalize divides."""
    norm = torch.linalg.vector_norm(vectors, dim=dim, keepdim=True)
    return norm, norm.clamp_min(_NORM_EPS).reciprocal_()


def _unit_backward(grad_unit: torch.Tensor, unit: torch.Tensor, inverse: torch.Tensor, dim: int) -> torch.Tensor:
    """Gradient of x -> x / |x| given the gradient of the unit vectors: (g - u <g, u>) / |x|."""
    return (grad_unit - unit * (grad_unit * unit).sum(dim, keepdim=True)) * inverse


def edge_affinity(
    nodes: torch.Tensor, incidence: torch.Tensor, softening: float = 0.0, edge_counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Second-order affinity: similarity of the edge vectors ``d = h_j - h_i`` of the two graphs.

    With ``softening`` s = 0 it is the cosine of the edge vectors. Its gradient grows as 1 / |d|: an edge between
    two near-duplicate images (consecutive slices of a volume) has a tiny vector whose direction is noise, yet it
    would get the largest gradient of the batch (17.6 at |d| = 0.1, 1.7e6 at |d| = 1e-6). With s > 0 each edge
    vector is divided by ``sqrt(|d|^2 + tau^2)`` instead of ``|d|``, tau^2 = s^2 times the mean ``|d|^2`` of its
    graph's edges (no gradient through tau): edges of typical length keep most of their cosine, edges much
    shorter than typical fade to 0, every affinity stays in [-1, 1] and the gradient per edge vector is at most
    ``1 / (2 tau)``, whatever the distances. tau is the graph's own scale, so the affinity does not change when
    all embeddings are scaled (as the cosine does not).

    Padding edges have a zero incidence row, thus a zero vector and zero affinity with every edge (and add
    nothing to the mean length).

    Args:
        nodes: (2G, n, F) vertex embeddings: view 1's G graphs, then view 2's.
        incidence: (2G, E, n) incidence rows of the graphs' edges, +1 at an edge's target and -1 at its source
            (``graph.incidence_rows``).
        softening: s >= 0, relative to the graph's root-mean-square edge length.
        edge_counts: (2G, 1, 1) positive numbers of real (not padding) edges per graph, in the nodes' dtype,
            needed when softening > 0 (e.g. ``adjacency.sum((1, 2), keepdim=True, dtype=nodes.dtype)``).

    Returns:
        (G, E, E) affinities in [-1, 1]: entry (e, f) compares edge e of graph 1 with edge f of graph 2.
    """
    if nodes.ndim != 3 or nodes.shape[0] % 2:
        raise ValueError(f"nodes must have shape (2G, n, F), got {tuple(nodes.shape)}.")
    if incidence.ndim != 3 or incidence.shape[0] != nodes.shape[0] or incidence.shape[2] != nodes.shape[1]:
        raise ValueError(
            f"incidence must have shape ({nodes.shape[0]}, E, {nodes.shape[1]}), got {tuple(incidence.shape)}."
        )
    if softening < 0:
        raise ValueError(f"softening must be non-negative, got {softening}.")
    # every edge vector in one product
    vectors = torch.bmm(incidence, nodes)
    if softening == 0:
        unit1, unit2 = unit_vectors(vectors)[0].chunk(2)
    else:
        if edge_counts is None or edge_counts.shape != (nodes.shape[0], 1, 1):
            shape = None if edge_counts is None else tuple(edge_counts.shape)
            raise ValueError(f"softening needs edge_counts of shape ({nodes.shape[0]}, 1, 1), got {shape}.")
        unit1, unit2 = _SoftenedUnitVectors.apply(vectors, softening, edge_counts).chunk(2)
    return torch.bmm(unit1, unit2.transpose(1, 2))

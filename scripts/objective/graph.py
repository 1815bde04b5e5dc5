"""Graphs over a batch of embeddings: k-nearest-neighbour edges and GCN message passing.

LVM-Med (Nguyen et al., NeurIPS 2023, section 3.2.1) turns each view's embeddings into a graph
whose vertices are the images of the batch, connects every vertex to its k nearest neighbours and
aggregates features with a graph convolutional network (Kipf & Welling, ICLR 2017; Eq. 1).
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import DenseGCNConv

__all__ = ["graph_sizes", "knn_edges", "pad_edges", "incidence_rows", "MessagePassing"]


def graph_sizes(num_nodes: int, graph_size: int) -> list[int]:
    """Cuts ``num_nodes`` vertices into ``ceil(num_nodes / graph_size)`` graphs of near-equal size.

    Leftovers are spread over the graphs (sizes differ by at most one) rather than dropped or left
    as a tiny last graph, so every image takes part in a matching with enough neighbours. A graph
    never has a single vertex: with ``graph_size=2`` an odd batch gets one graph of 3.

    Example: ``graph_sizes(37, 16) == [13, 12, 12]``.
    """
    if graph_size < 2:
        raise ValueError(f"graph_size must be at least 2, got {graph_size}.")
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be positive, got {num_nodes}.")
    count = -(-num_nodes // graph_size)
    if count > 1 and num_nodes // count < 2:
        count -= 1
    base, extra = divmod(num_nodes, count)
    return [base + 1] * extra + [base] * (count - extra)


def knn_edges(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetric k-nearest-neighbour edges of each graph in a batch of equal-size graphs.

    Neighbours are ranked by cosine similarity of the embeddings (equivalently, Euclidean distance of the
    L2-normalised vectors). Every vertex is linked to its ``min(k, n - 1)`` nearest other vertices and
    the graph is made undirected, so each edge appears in both directions. Built with
    a similarity product + ``topk`` because torch-geometric's ``knn_graph`` needs pyg-lib, which is not on PyPI.

    Args:
        embeddings: (G, n, F) embeddings of G graphs of n vertices each.
        k: neighbours per vertex.

    Returns:
        (G, n, n) bool adjacency matrices, symmetric, with an empty diagonal.
    """
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must have shape (G, n, F), got {tuple(embeddings.shape)}.")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}.")
    num_nodes = embeddings.shape[1]
    k = min(k, num_nodes - 1)
    adjacency = torch.zeros(embeddings.shape[:2] + (num_nodes,), dtype=torch.bool, device=embeddings.device)
    if k == 0:
        return adjacency
    with torch.no_grad():
        unit = nn.functional.normalize(embeddings, dim=-1)
        similarity = unit @ unit.transpose(1, 2)
        similarity.diagonal(dim1=1, dim2=2).fill_(-torch.inf)
        adjacency.scatter_(2, similarity.topk(k, dim=-1).indices, True)
    return adjacency | adjacency.transpose(1, 2)


def pad_edges(adjacency: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Directed edge lists of a batch of graphs, padded to a common length with (0, 0) rows.

    A length fixed by the caller (e.g. ``2 n k``, the most edges a symmetric kNN graph can have) needs
    no device-to-host synchronisation; None takes the largest edge count of the batch (one).

    Args:
        adjacency: (G, n, n) bool adjacency matrices without self-loops.
        width: length E of every list, at least the largest edge count (extra edges would be dropped);
            None: the largest edge count.

    Returns:
        long tensor (G, E, 2) of (source, target) pairs in row-major order; padding rows are (0, 0),
        which no real edge is.
    """
    if width is None:
        width = int(adjacency.sum(dim=(1, 2)).max()) if adjacency.shape[0] else 0
    if width < 0:
        raise ValueError(f"width must be non-negative, got {width}.")
    num_nodes = adjacency.shape[-1]
    flat = adjacency.flatten(1).to(torch.uint8)  # uint8: CUDA sorts have not always accepted bool
    width = min(width, flat.shape[1])
    # a stable descending sort lists the edges first, in row-major order, then the non-edges (position 0: (0, 0))
    present, position = flat.sort(dim=1, descending=True, stable=True)
    position = position[:, :width] * present[:, :width]
    return torch.stack([position // num_nodes, position % num_nodes], dim=-1)


def incidence_rows(edges: torch.Tensor, num_nodes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Incidence matrices of padded edge lists: (G, E, 2) long -> (G, E, n), row e +1 at edge e's target and -1 at
    its source, so that ``incidence @ nodes`` gives every edge vector ``h_j - h_i``. Padding rows (0, 0) get
    +1 - 1 = 0 at vertex 0: a zero row."""
    incidence = edges.new_zeros((*edges.shape[:-1], num_nodes), dtype=dtype)
    return incidence.scatter_(-1, edges[..., 1:], 1.0).scatter_(-1, edges[..., :1], -1.0, reduce="add")


class MessagePassing(nn.Module):
    """Graph convolutional network shared by the two views' graphs (LVM-Med Eq. 1).

    Each layer computes ``D^-1/2 (A + I) D^-1/2 H W + b`` with the parameters of torch-geometric's
    ``DenseGCNConv`` (the dense batched form of ``GCNConv``: graphs of ~16 vertices, where the sparse form's
    edge-index handling costs device-to-host synchronisations and many small launches); the normalised
    adjacency is built once and shared by the layers, the same outputs as ``DenseGCNConv.forward``; a ReLU
    follows every layer but the last, so the output embeddings are not confined to the
    non-negative orthant before cosine similarities are taken.

    With ``residual=True`` (default) the input embedding is added to the GCN's output. Eq. 1 alone
    averages every vertex with its k nearest neighbours twice, and those neighbours are exactly the
    images the matching must tell apart: on a toy problem (``docs/objective.md``) the plain GCN kept
    matching accuracy near 0.27 where the residual one reached 0.89. ``residual=False`` is Eq. 1 as
    printed.

    Args:
        in_features: size of the input embeddings.
        hidden_features: sizes of the layers; the last one is the output size (equal to
            ``in_features`` when ``residual``).
        residual: add the input embeddings to the output.

    Example::

        gcn = MessagePassing(128, (128, 128))
        out = gcn(torch.randn(2, 16, 128), knn_edges(torch.randn(2, 16, 128), k=5))  # (2, 16, 128)
    """

    def __init__(
        self, in_features: int = 128, hidden_features: tuple[int, ...] = (128, 128), residual: bool = True
    ) -> None:
        super().__init__()
        sizes = [in_features, *hidden_features]
        if len(hidden_features) < 1 or min(sizes) < 1:
            raise ValueError(f"MessagePassing needs at least one layer of positive size, got {sizes}.")
        if residual and sizes[-1] != in_features:
            raise ValueError(f"a residual GCN must end with in_features={in_features} features, got {sizes[-1]}.")
        self.layers = nn.ModuleList(DenseGCNConv(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = nn.ReLU()
        self.residual = residual

    def forward(self, embeddings: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: (G, n, F) vertex features of G graphs.
            adjacency: (G, n, n) bool adjacency matrices.

        Returns:
            (G, n, hidden_features[-1]) vertex embeddings after message passing.
        """
        if embeddings.ndim != 3 or adjacency.shape != embeddings.shape[:2] + embeddings.shape[1:2]:
            raise ValueError(
                f"MessagePassing expects embeddings (G, n, F) and adjacency (G, n, n), "
                f"got {tuple(embeddings.shape)} and {tuple(adjacency.shape)}."
            )
        propagation = _gcn_propagation(adjacency, embeddings.dtype)
        x = embeddings
        for index, layer in enumerate(self.layers):
            x = torch.baddbmm(layer.bias, propagation, layer.lin(x))
            if index < len(self.layers) - 1:
                x = self.activation(x)
        return embeddings + x if self.residual else x


def _gcn_propagation(adjacency: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(G, n, n) ``D^-1/2 (A + I) D^-1/2`` of bool adjacency matrices without self-loops, as ``DenseGCNConv``
    builds it (self-loop weight 1). Built once for all layers: ``DenseGCNConv.forward`` rebuilds it in every
    layer (13 operator calls per layer instead of 2)."""
    with_loops = adjacency.to(dtype, copy=True)
    with_loops.diagonal(dim1=1, dim2=2).fill_(1.0)
    scale = with_loops.sum(-1, keepdim=True).rsqrt_()  # (G, n, 1); degree >= 1 with the self-loop
    return with_loops.mul_(scale).mul_(scale.transpose(1, 2))

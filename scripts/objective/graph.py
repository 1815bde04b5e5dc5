"""Graphs over a batch of embeddings: k-nearest-neighbour edges and GCN message passing.

LVM-Med (Nguyen et al., NeurIPS 2023, section 3.2.1) turns each view's embeddings into a graph
whose vertices are the images of the batch, connects every vertex to its k nearest neighbours and
aggregates features with a graph convolutional network (Kipf & Welling, ICLR 2017; Eq. 1).
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import GCNConv

__all__ = ["graph_sizes", "knn_edges", "pad_edges", "MessagePassing"]


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

    Neighbours are ranked by cosine similarity of the embeddings (Euclidean distance of the
    L2-normalised vectors). Every vertex is linked to its ``min(k, n - 1)`` nearest other vertices and
    the graph is made undirected, so each edge appears in both directions. Built with
    ``torch.cdist`` + ``topk`` because torch-geometric's ``knn_graph`` needs pyg-lib, which is not on PyPI.

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
    unit = nn.functional.normalize(embeddings.detach(), dim=-1)
    distances = torch.cdist(unit, unit)
    distances.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    neighbours = distances.topk(k, dim=-1, largest=False).indices
    adjacency.scatter_(2, neighbours, True)
    return adjacency | adjacency.transpose(1, 2)


def pad_edges(adjacency: torch.Tensor) -> torch.Tensor:
    """Directed edge lists of a batch of graphs, padded to a common length with (0, 0) rows.

    Args:
        adjacency: (G, n, n) bool adjacency matrices without self-loops.

    Returns:
        long tensor (G, E, 2) of (source, target) pairs, E the largest edge count in the batch;
        padding rows are (0, 0), which no real edge is.
    """
    counts = adjacency.sum(dim=(1, 2))
    width = int(counts.max()) if adjacency.shape[0] else 0
    edges = torch.zeros(adjacency.shape[0], width, 2, dtype=torch.long, device=adjacency.device)
    graph, source, target = adjacency.nonzero(as_tuple=True)
    # position of each edge inside its graph's list: running count minus the graph's offset
    offsets = torch.cumsum(counts, 0) - counts
    slot = torch.arange(graph.numel(), device=adjacency.device) - offsets[graph]
    edges[graph, slot] = torch.stack([source, target], dim=1)
    return edges


class MessagePassing(nn.Module):
    """Graph convolutional network shared by the two views' graphs (LVM-Med Eq. 1).

    Each layer computes ``D^-1/2 (A + I) D^-1/2 H W`` (torch-geometric's ``GCNConv``); a ReLU
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
        self.layers = nn.ModuleList(GCNConv(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
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
        num_graphs, num_nodes, _ = embeddings.shape
        graph, source, target = adjacency.nonzero(as_tuple=True)
        # the G graphs as one disjoint union, the batching torch-geometric expects
        edge_index = torch.stack([graph * num_nodes + source, graph * num_nodes + target])
        x = embeddings.reshape(num_graphs * num_nodes, -1)
        for index, layer in enumerate(self.layers):
            x = layer(x, edge_index)
            if index < len(self.layers) - 1:
                x = self.activation(x)
        x = x.reshape(num_graphs, num_nodes, -1)
        return embeddings + x if self.residual else x

from __future__ import annotations

import itertools

import pytest
import torch

from scripts.objective.graph import MessagePassing, graph_sizes, knn_edges, pad_edges


@pytest.mark.parametrize("num_nodes,graph_size", list(itertools.product([1, 2, 5, 15, 16, 17, 37, 64, 100], [2, 3, 16])))
def test_graph_sizes_cover_every_image_with_balanced_graphs(num_nodes: int, graph_size: int) -> None:
    sizes = graph_sizes(num_nodes, graph_size)
    assert sum(sizes) == num_nodes
    assert max(sizes) <= max(graph_size, 3) and max(sizes) - min(sizes) <= 1
    assert len(sizes) in (num_nodes // graph_size, -(-num_nodes // graph_size))
    assert sizes == sorted(sizes, reverse=True)
    if num_nodes >= 2:
        assert min(sizes) >= 2


def test_graph_sizes_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="graph_size"):
        graph_sizes(10, 1)
    with pytest.raises(ValueError, match="num_nodes"):
        graph_sizes(0, 16)


def test_knn_edges_link_each_vertex_to_its_cosine_nearest_neighbours() -> None:
    embeddings = torch.randn(3, 10, 6)
    adjacency = knn_edges(embeddings, k=3)
    unit = torch.nn.functional.normalize(embeddings, dim=-1)
    for g in range(3):
        similarity = unit[g] @ unit[g].T
        for i in range(10):
            others = [j for j in range(10) if j != i]
            nearest = sorted(others, key=lambda j: -float(similarity[i, j]))[:3]
            assert all(adjacency[g, i, j] and adjacency[g, j, i] for j in nearest)
    assert torch.equal(adjacency, adjacency.transpose(1, 2))
    assert not adjacency.diagonal(dim1=1, dim2=2).any()
    # every vertex has at least k neighbours, and no edge exists that neither end chose
    assert (adjacency.sum(-1) >= 3).all() and int(adjacency.sum()) <= 2 * 3 * 10 * 3


def test_knn_edges_cap_k_for_small_graphs() -> None:
    adjacency = knn_edges(torch.randn(1, 3, 4), k=5)
    assert torch.equal(adjacency[0], ~torch.eye(3, dtype=torch.bool))
    assert not knn_edges(torch.randn(2, 1, 4), k=5).any()


def test_pad_edges_lists_each_graphs_edges_then_padding() -> None:
    adjacency = knn_edges(torch.randn(4, 9, 5), k=2)
    edges = pad_edges(adjacency)
    assert edges.shape == (4, int(adjacency.sum((1, 2)).max()), 2)
    for g in range(4):
        count = int(adjacency[g].sum())
        real = {tuple(edge) for edge in edges[g, :count].tolist()}
        assert real == {tuple(edge) for edge in adjacency[g].nonzero().tolist()}
        assert (edges[g, count:] == 0).all()


@pytest.mark.parametrize("residual", [False, True])
def test_message_passing_computes_normalised_graph_convolution_of_eq1(residual: bool) -> None:
    gcn = MessagePassing(5, (7, 5), residual=residual)
    embeddings = torch.randn(2, 6, 5)
    adjacency = knn_edges(embeddings, k=2)
    expected = []
    for g in range(2):
        a_hat = adjacency[g].float() + torch.eye(6)
        d_inv_sqrt = a_hat.sum(1).rsqrt()
        propagate = d_inv_sqrt[:, None] * a_hat * d_inv_sqrt[None, :]
        h = embeddings[g]
        for index, layer in enumerate(gcn.layers):
            h = propagate @ (h @ layer.lin.weight.T) + layer.bias
            if index == 0:
                h = h.relu()
        expected.append(h + embeddings[g] if residual else h)
    torch.testing.assert_close(gcn(embeddings, adjacency), torch.stack(expected))
    with pytest.raises(ValueError, match="residual"):
        MessagePassing(5, (7, 3), residual=True)


def test_message_passing_equals_torch_geometrics_dense_gcn_layers() -> None:
    """The shared normalised adjacency gives DenseGCNConv.forward's outputs with the same parameters."""
    gcn = MessagePassing(5, (7, 5), residual=False)
    torch.nn.init.normal_(gcn.layers[0].bias)
    embeddings = torch.randn(3, 6, 5)
    adjacency = knn_edges(embeddings, k=2)
    weights = adjacency.float()
    expected = gcn.layers[1](gcn.layers[0](embeddings, weights).relu(), weights)
    torch.testing.assert_close(gcn(embeddings, adjacency), expected)
    assert not adjacency.diagonal(dim1=1, dim2=2).any()  # the input is not changed in place


def test_message_passing_keeps_graphs_apart_and_checks_shapes() -> None:
    gcn = MessagePassing(4, (4, 4))
    embeddings = torch.randn(2, 5, 4)
    adjacency = knn_edges(embeddings, k=2)
    together = gcn(embeddings, adjacency)
    alone = gcn(embeddings[1:], adjacency[1:])
    torch.testing.assert_close(together[1:], alone)
    with pytest.raises(ValueError, match=r"got \(2, 5, 4\) and \(2, 4, 4\)"):
        gcn(embeddings, adjacency[:, :4, :4])

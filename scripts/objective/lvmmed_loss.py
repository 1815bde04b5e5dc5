"""The self-supervised objective of LVM-Med: second-order graph matching of two augmented views."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from scripts.objective.affinity import edge_affinity, global_affinity, local_affinity
from scripts.objective.geometry import pool_grid
from scripts.objective.graph import MessagePassing, graph_sizes, knn_edges, pad_edges
from scripts.objective.hamming import hamming_distance
from scripts.objective.imle import Solver, imle_match
from scripts.objective.qap import GraphMatchingSolver, QAPBatch, linear_assignment

__all__ = ["LVMMedLoss"]


def _check_types(**values: tuple[object, type | tuple[type, ...]]) -> None:
    """Refuses a hyperparameter of the wrong type (e.g. the string "no" for a switch, which would be truthy),
    naming it. Integers are accepted where floats are expected; booleans are not accepted as numbers."""
    for name, (value, expected) in values.items():
        accepted = (int, float) if expected is float else expected
        is_bool = isinstance(value, bool)
        wrong_bool = is_bool and expected is not bool and (not isinstance(expected, tuple) or bool not in expected)
        if wrong_bool or not isinstance(value, accepted):
            wanted = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
            raise TypeError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__}).")


class LVMMedLoss(nn.Module):
    """Graph-matching loss of LVM-Med.

    Nguyen et al., "LVM-Med: Learning Large-Scale Self-Supervised Vision Models for Medical Imaging via
    Second-order Graph Matching", NeurIPS 2023 (section 3.2, appendix A).

    The batch is cut into graphs of about ``graph_size`` images. In each, view 1's and view 2's
    embeddings form two k-nearest-neighbour graphs, a GCN shared by both views passes messages
    along their edges, and the two graphs are matched: vertex affinities mix the cosine similarity of
    the GCN outputs (weight ``alpha``) with a local affinity of the feature maps, edge affinities compare
    edge vectors, and Gumbel-perturbed quadratic assignment problems are solved. The loss is the
    Hamming distance of the matching to the true one (view i <-> view i), averaged over graphs; its
    gradient reaches the affinities through IMLE.

    The module owns the GCN's parameters: give them to the optimizer with the network's.

    Args:
        embedding_dim: size F of the projector's embeddings.
        graph_size: images per graph (a batch of N images gives ceil(N / graph_size) graphs of
            near-equal size).
        num_neighbors: k of the k-nearest-neighbour graphs (below graph_size).
        alpha: weight of the global affinity; 1 - alpha goes to the local affinity.
        lambda_: IMLE finite-difference step, in units of one graph's Hamming loss.
        num_samples: IMLE noise samples per step.
        noise_scale: scale of the Gumbel noise, relative to affinities that are cosines in [-1, 1]
            (1.0 drowns them: see ``docs/objective.md``).
        gcn_features: layer sizes of the GCN.
        gcn_residual: add the GCN's input to its output (``MessagePassing``); False is Eq. 1 as printed.
        local_grid_size: feature maps larger than this per side are average-pooled to it before the
            local affinity (its cost grows with the square of the number of cells); None keeps them.
        second_order: use edge affinities (quadratic assignment); False solves a linear assignment
            on the vertex affinities (ablation i of the paper).
        message_passing: use the GCN; False matches the projector embeddings directly (ablation ii).
        noise: "gumbel", or "none" for the paper's constant-noise ablation (iii).
        local_similarity: use the local affinity; False sets the vertex affinity to the global one
            (ablation iv).
        solver: MAP solver of the quadratic problems; defaults to ``GraphMatchingSolver()``.

    Example::

        loss_fn = LVMMedLoss(embedding_dim=128)
        feature_map1, pooled1 = encoder(view1)  # (N, D, R, S), (N, D)
        feature_map2, pooled2 = encoder(view2)
        loss = loss_fn(projector(pooled1), projector(pooled2), feature_map1, feature_map2, grid1, grid2)
        loss.backward()
    """

    def __init__(
        self,
        embedding_dim: int = 128,
        graph_size: int = 16,
        num_neighbors: int = 5,
        alpha: float = 0.8,
        lambda_: float = 80.0,
        num_samples: int = 1,
        noise_scale: float = 0.1,
        gcn_features: tuple[int, ...] = (128, 128),
        gcn_residual: bool = True,
        local_grid_size: int | None = None,
        second_order: bool = True,
        message_passing: bool = True,
        noise: Literal["gumbel", "none"] = "gumbel",
        local_similarity: bool = True,
        solver: Solver | None = None,
    ) -> None:
        super().__init__()
        _check_types(
            embedding_dim=(embedding_dim, int), graph_size=(graph_size, int), num_neighbors=(num_neighbors, int),
            alpha=(alpha, float), lambda_=(lambda_, float), num_samples=(num_samples, int),
            noise_scale=(noise_scale, float), gcn_residual=(gcn_residual, bool), second_order=(second_order, bool),
            message_passing=(message_passing, bool), local_similarity=(local_similarity, bool),
            noise=(noise, str), local_grid_size=(local_grid_size, (int, type(None))),
        )
        if graph_size < 2:
            raise ValueError(f"graph_size must be at least 2, got {graph_size}.")
        if not 1 <= num_neighbors < graph_size:
            raise ValueError(f"num_neighbors must be in [1, graph_size={graph_size}), got {num_neighbors}.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        if lambda_ <= 0:
            raise ValueError(f"lambda_ must be positive, got {lambda_}.")
        if noise not in ("gumbel", "none"):
            raise ValueError(f"noise must be 'gumbel' or 'none', got {noise!r}.")
        if num_samples < 1 or noise_scale <= 0:
            raise ValueError(f"num_samples and noise_scale must be positive, got {num_samples}, {noise_scale}.")
        if local_grid_size is not None and local_grid_size < 1:
            raise ValueError(f"local_grid_size must be positive or None, got {local_grid_size}.")
        self.embedding_dim = embedding_dim
        self.graph_size = graph_size
        self.num_neighbors = num_neighbors
        self.alpha = alpha
        self.lambda_ = lambda_
        self.num_samples = num_samples
        self.noise_scale = noise_scale
        self.local_grid_size = local_grid_size
        self.second_order = second_order
        self.noise = noise
        self.local_similarity = local_similarity and alpha < 1.0
        self.gcn = MessagePassing(embedding_dim, gcn_features, gcn_residual) if message_passing else None
        self.solver: Solver = solver if solver is not None else GraphMatchingSolver()
        # share of images whose first view was matched to its own second view in the last forward
        self.last_match_accuracy = torch.tensor(float("nan"))
        # non-zero and total entries of the IMLE gradient on the vertex affinities in the last backward
        self._gradient_entries = [0, 0]

    def forward(
        self,
        embeddings1: torch.Tensor,
        embeddings2: torch.Tensor,
        features1: torch.Tensor | None = None,
        features2: torch.Tensor | None = None,
        grid1: torch.Tensor | None = None,
        grid2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            embeddings1: (N, F) projector embeddings of the first views.
            embeddings2: (N, F) projector embeddings of the second views, image i at row i.
            features1: (N, D, R, S) encoder feature maps of the first views (needed for the local affinity).
            features2: (N, D, R2, S2) feature maps of the second views.
            grid1: (N, R, S, 2) centre of each cell of ``features1`` in its original image, (y, x) in [0, 1].
            grid2: (N, R2, S2, 2) same for ``features2``.

        Returns:
            scalar loss: mean over graphs of the Hamming distance to the true matching. A batch of one
            image has no matching to learn from and gives zero.
        """
        self._check_inputs(embeddings1, embeddings2, features1, features2, grid1, grid2)
        self._gradient_entries = [0, 0]
        num_images = embeddings1.shape[0]
        if num_images < 2:
            self.last_match_accuracy = torch.tensor(float("nan"))
            return embeddings1.sum() * 0.0
        sizes = graph_sizes(num_images, self.graph_size)
        total = embeddings1.new_zeros(())
        correct = embeddings1.new_zeros(())
        start = 0
        # graphs come in at most two sizes; each size is one batched problem
        for size in sorted(set(sizes), reverse=True):
            count = sizes.count(size)
            rows = slice(start, start + count * size)
            start += count * size
            local = None
            if self.local_similarity:
                local = self._local_affinity(features1[rows], features2[rows], grid1[rows], grid2[rows], count)
            matching = self._match(embeddings1[rows].reshape(count, size, -1), embeddings2[rows].reshape(count, size, -1), local, len(sizes))
            total = total + hamming_distance(matching).sum()
            correct = correct + matching.detach().diagonal(dim1=1, dim2=2).sum()
        self.last_match_accuracy = correct / num_images
        return total / len(sizes)

    def _match(
        self, embeddings1: torch.Tensor, embeddings2: torch.Tensor, local: torch.Tensor | None, num_graphs: int
    ) -> torch.Tensor:
        """(G, n, n) IMLE matchings of G graph pairs built from (G, n, F) embeddings."""
        adjacency1 = knn_edges(embeddings1, self.num_neighbors)
        adjacency2 = knn_edges(embeddings2, self.num_neighbors)
        nodes1, nodes2 = embeddings1, embeddings2
        if self.gcn is not None:
            nodes1, nodes2 = self.gcn(embeddings1, adjacency1), self.gcn(embeddings2, adjacency2)
        unary = global_affinity(nodes1, nodes2)
        if local is not None:
            unary = self.alpha * unary + (1.0 - self.alpha) * local
        if self.second_order:
            edges1, edges2 = pad_edges(adjacency1), pad_edges(adjacency2)
            pairwise = edge_affinity(nodes1, edges1, nodes2, edges2)
            solver = self.solver
        else:
            edges1 = edges2 = unary.new_zeros((unary.shape[0], 0, 2), dtype=torch.long)
            pairwise = unary.new_zeros((unary.shape[0], 0, 0))
            solver = _linear_assignment_solver
        if unary.requires_grad:
            unary.register_hook(self._count_gradient_entries)
        problem = QAPBatch(unary=unary, edges1=edges1, edges2=edges2, pairwise=pairwise)
        # the objective averages over graphs, which scales each graph's gradient by 1 / num_graphs;
        # the step is scaled back so that lambda keeps the meaning it has for a single graph
        return imle_match(problem, solver, self.lambda_ * num_graphs, self.noise, self.noise_scale, self.num_samples)

    @property
    def last_gradient_nonzero_share(self) -> float:
        """Share of non-zero entries of the IMLE gradient on the vertex affinities in the last backward.

        Zero means the perturbed and target matchings agreed everywhere: no learning signal.
        """
        nonzero, total = self._gradient_entries
        return nonzero / total if total else float("nan")

    def _count_gradient_entries(self, gradient: torch.Tensor) -> None:
        self._gradient_entries[0] += int(gradient.count_nonzero())
        self._gradient_entries[1] += gradient.numel()

    def _local_affinity(
        self,
        features1: torch.Tensor,
        features2: torch.Tensor,
        grid1: torch.Tensor,
        grid2: torch.Tensor,
        num_graphs: int,
    ) -> torch.Tensor:
        """(G, n, n) local affinities of (G*n, D, R, S) feature maps and (G*n, R, S, 2) grids."""
        if self.local_grid_size is not None:
            features1, grid1 = self._pool(features1, grid1)
            features2, grid2 = self._pool(features2, grid2)

        def cells(features: torch.Tensor) -> torch.Tensor:
            return features.flatten(2).transpose(1, 2).reshape(num_graphs, -1, features.shape[2] * features.shape[3], features.shape[1])

        def centres(grid: torch.Tensor) -> torch.Tensor:
            return grid.reshape(num_graphs, -1, grid.shape[1] * grid.shape[2], 2)

        return local_affinity(cells(features1), cells(features2), centres(grid1), centres(grid2))

    def _pool(self, features: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.local_grid_size
        target = (min(features.shape[2], size), min(features.shape[3], size))
        return F.adaptive_avg_pool2d(features, target), pool_grid(grid, size)

    def _check_inputs(
        self,
        embeddings1: torch.Tensor,
        embeddings2: torch.Tensor,
        features1: torch.Tensor | None,
        features2: torch.Tensor | None,
        grid1: torch.Tensor | None,
        grid2: torch.Tensor | None,
    ) -> None:
        expected = f"(N, {self.embedding_dim})"
        for name, value in (("embeddings1", embeddings1), ("embeddings2", embeddings2)):
            if value.ndim != 2 or value.shape[1] != self.embedding_dim:
                raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}.")
        if embeddings1.shape != embeddings2.shape:
            raise ValueError(f"embeddings1 and embeddings2 differ: {tuple(embeddings1.shape)} vs {tuple(embeddings2.shape)}.")
        _check_finite(embeddings1=embeddings1, embeddings2=embeddings2)
        if not self.local_similarity:
            return
        if features1 is None or features2 is None or grid1 is None or grid2 is None:
            raise ValueError("the local affinity needs features1, features2, grid1 and grid2 (or local_similarity=False).")
        num_images = embeddings1.shape[0]
        for name, features, grid in (("1", features1, grid1), ("2", features2, grid2)):
            if features.ndim != 4 or features.shape[0] != num_images:
                raise ValueError(f"features{name} must have shape ({num_images}, D, R, S), got {tuple(features.shape)}.")
            if grid.shape != (num_images, *features.shape[2:], 2):
                raise ValueError(
                    f"grid{name} must have shape {(num_images, *features.shape[2:], 2)} to match features{name}, "
                    f"got {tuple(grid.shape)}."
                )
        if features1.shape[1] != features2.shape[1]:
            raise ValueError(f"features1 and features2 have {features1.shape[1]} and {features2.shape[1]} channels.")
        _check_finite(features1=features1, features2=features2)


def _check_finite(**tensors: torch.Tensor) -> None:
    for name, value in tensors.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or Inf values.")


def _linear_assignment_solver(problem: QAPBatch) -> torch.Tensor:
    """Vertex-to-vertex matching only, for the no-second-order ablation."""
    return linear_assignment(problem.unary)

"""The self-supervised objective of LVM-Med: second-order graph matching of two augmented views."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from scripts.objective.affinity import edge_affinity, global_affinity, local_affinity
from scripts.objective.geometry import grid_box, pool_grid
from scripts.objective.graph import MessagePassing, graph_sizes, incidence_rows, knn_edges, pad_edges
from scripts.objective.imle import IMLEState, Solver, imle_linear_loss
from scripts.objective.qap import GraphMatchingSolver, QAPBatch, linear_assignment

__all__ = ["LVMMedLoss"]

_GRADIENT_PATHS = ("vertex", "edge", "local")
_AUTO_GRID_SIZE = 8  # local_grid_size="auto": at most 8 x 8 cells, 4,096 cell pairs per image pair


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
        lambda_: IMLE finite-difference step: the target problem moves every vertex affinity by
            +-lambda_ (towards the true matching), in the affinities' own units (cosines in [-1, 1]),
            whatever the loss's weight or AMP's loss scale (see ``docs/objective.md``).
        num_samples: IMLE noise samples per step.
        noise_scale: scale of the Gumbel noise: in the affinities' own units (cosines in [-1, 1]) with
            ``noise_reference="absolute"`` (default), in units of the standard deviation of each graph's vertex
            affinities with ``"spread"`` (see ``docs/objective.md``).
        noise_reference: "absolute" or "spread" (``imle.imle_linear_loss``): a fixed scale stops perturbing the
            matching once the true pairs stand out by a few times the scale, and the gradient is then exactly zero
            while the representation may still be poor; "spread" keeps it alive on probes, but on ``make demo`` it
            let the embeddings collapse (``docs/objective.md``), so it is not the default.
        margin: the constant that replaces the noise when ``noise="none"``: subtracted from the
            true-match vertex affinities, as BB-GM's margin (ablation iii).
        gcn_features: layer sizes of the GCN.
        gcn_residual: add the GCN's input to its output (``MessagePassing``); False is Eq. 1 as printed.
        local_grid_size: feature maps larger than this per side are average-pooled to it before the
            local affinity (its memory grows with the square of the number of cells); "auto" pools to at
            most 8 x 8 cells (at most 4,096 cell pairs per image pair: ResNet-50's 7 x 7 maps stay, a ViT's
            64 x 64 maps are pooled); None keeps every cell.
        local_num_matches: gamma of appendix A, the best cell matches kept per local term (None: all).
        edge_weight: weight of the edge (second-order) term against the vertex term in the matching score.
        edge_normalisation: "degree" divides the edge affinities by the graphs' mean number of directed edges per
            vertex, so that at ``edge_weight`` 1 a vertex's matched edges count at most as much as its vertex
            affinity (BB-GM halves its quadratic costs for the same double count); "none" sums every directed
            edge pair as it is (default: on ``make demo`` the degree-normalised term let the embeddings collapse,
            ``docs/objective.md``).
        edge_softening: s of ``affinity.edge_affinity``: edge vectors are divided by sqrt(|d|^2 + tau^2),
            tau = s times the graph's root-mean-square edge length, instead of |d|: bounded gradients for the
            short edges between near-duplicate images (0: the plain cosine, whose gradient grows as 1 / |d|).
        vertex_centring: take the global affinity's cosines of the vertex embeddings minus their graph's mean
            (``affinity.global_affinity``): the edge affinities compare differences of vertices and cannot see the
            embeddings' common component; centred, the vertex term cannot either, and the two terms' gradients keep
            their ratio as the embeddings concentrate (uncentred, the edge / vertex ratio grows as 1 / spread^2:
            ``docs/objective.md``).
        second_order: use edge affinities (quadratic assignment); False solves a linear assignment
            on the vertex affinities (ablation i of the paper).
        message_passing: use the GCN; False matches the projector embeddings directly (ablation ii).
        noise: "gumbel", or "none" for the paper's no-Gumbel ablation (iii): a constant margin instead.
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
        lambda_: float = 3.0,
        num_samples: int = 1,
        noise_scale: float = 0.1,
        noise_reference: Literal["spread", "absolute"] = "absolute",
        margin: float = 1.0,
        gcn_features: tuple[int, ...] = (128, 128),
        gcn_residual: bool = True,
        local_grid_size: int | Literal["auto"] | None = "auto",
        local_num_matches: int | None = 20,
        edge_weight: float = 1.0,
        edge_normalisation: Literal["degree", "none"] = "none",
        edge_softening: float = 0.5,
        vertex_centring: bool = False,
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
            noise=(noise, str), local_grid_size=(local_grid_size, (int, str, type(None))), margin=(margin, float),
            local_num_matches=(local_num_matches, (int, type(None))), edge_weight=(edge_weight, float),
            noise_reference=(noise_reference, str), edge_normalisation=(edge_normalisation, str),
            edge_softening=(edge_softening, float), vertex_centring=(vertex_centring, bool),
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
        if isinstance(local_grid_size, str) and local_grid_size != "auto":
            raise ValueError(f"local_grid_size must be a positive int, 'auto' or None, got {local_grid_size!r}.")
        if isinstance(local_grid_size, int) and local_grid_size < 1:
            raise ValueError(f"local_grid_size must be positive, 'auto' or None, got {local_grid_size}.")
        if local_num_matches is not None and local_num_matches < 1:
            raise ValueError(f"local_num_matches must be positive or None, got {local_num_matches}.")
        if margin < 0 or edge_weight < 0 or edge_softening < 0:
            raise ValueError(
                f"margin, edge_weight and edge_softening must be non-negative, got {margin}, {edge_weight}, "
                f"{edge_softening}."
            )
        if noise_reference not in ("spread", "absolute"):
            raise ValueError(f"noise_reference must be 'spread' or 'absolute', got {noise_reference!r}.")
        if edge_normalisation not in ("degree", "none"):
            raise ValueError(f"edge_normalisation must be 'degree' or 'none', got {edge_normalisation!r}.")
        self.embedding_dim = embedding_dim
        self.graph_size = graph_size
        self.num_neighbors = num_neighbors
        self.alpha = alpha
        self.lambda_ = lambda_
        self.num_samples = num_samples
        self.noise_scale = noise_scale
        self.noise_reference = noise_reference
        self.margin = margin
        self.local_grid_size = _AUTO_GRID_SIZE if local_grid_size == "auto" else local_grid_size
        self.local_num_matches = local_num_matches
        self.edge_weight = edge_weight
        self.edge_normalisation = edge_normalisation
        self.edge_softening = edge_softening
        self.vertex_centring = vertex_centring
        self.second_order = second_order
        self.noise = noise
        self.local_similarity = local_similarity and alpha < 1.0
        self.gcn = MessagePassing(embedding_dim, gcn_features, gcn_residual) if message_passing else None
        # built after the modules so that torch's seed (set_determinism, manual_seed) fixes its random starts
        self.solver: Solver = solver if solver is not None else GraphMatchingSolver()
        # Hamming distance of the last forward's matchings, over all graphs, and its number of images
        self._hamming_total: torch.Tensor | None = None
        self._num_images = 0
        # the IMLE solutions of the last step, one state per graph size
        self._states: list[IMLEState] = []
        # squared norms of the last backward's gradients per path (see ``last_gradient_norms``)
        self._path_gradients: dict[str, list[torch.Tensor]] = {}
        # off by default: the hooks cost 8 operator calls per step (``ObjectiveStats`` turns them on now and then)
        self.track_gradient_paths = False
        self._hamming_costs: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

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
            scalar loss: mean over graphs of the Hamming distance to the true matching, in float32. The
            objective computes in float32 whatever autocast is active; gradients reach the inputs in
            their own dtype. A batch of one image has no matching to learn from and gives zero.
        """
        self._check_inputs(embeddings1, embeddings2, features1, features2, grid1, grid2)
        self._states = []
        self._path_gradients = {path: [] for path in _GRADIENT_PATHS}
        self._hamming_total, self._num_images = None, embeddings1.shape[0]
        if self._num_images < 2:
            return embeddings1.float().sum() * 0.0
        with torch.autocast(device_type=embeddings1.device.type, enabled=False):
            return self._graph_matching_loss(*(_as_float32(t) for t in (
                embeddings1, embeddings2, features1, features2, grid1, grid2)))

    def _graph_matching_loss(
        self,
        embeddings1: torch.Tensor,
        embeddings2: torch.Tensor,
        features1: torch.Tensor | None,
        features2: torch.Tensor | None,
        grid1: torch.Tensor | None,
        grid2: torch.Tensor | None,
    ) -> torch.Tensor:
        num_images = embeddings1.shape[0]
        sizes = graph_sizes(num_images, self.graph_size)
        inputs = (embeddings1, embeddings2, features1, features2, grid1, grid2)
        total: torch.Tensor | None = None
        start = 0
        # graphs come in at most two sizes; each size is one batched problem
        for size in sorted(set(sizes), reverse=True):
            count = sizes.count(size)
            rows = slice(start, start + count * size)
            start += count * size
            part = inputs if count * size == num_images else tuple(None if t is None else t[rows] for t in inputs)
            local = self._local_affinity(*part[2:], count) if self.local_similarity else None
            # both views' graphs in one batch (2G, n, F): half the operator calls (kernel launches on CUDA)
            embeddings = torch.cat(part[:2]).view(2 * count, size, -1)
            distance = self._match(embeddings, local).sum() + count * size
            total = distance if total is None else total + distance
        # the Hamming distance of a matching is twice its wrongly matched images
        self._hamming_total = total.detach()
        return total if len(sizes) == 1 else total / len(sizes)

    def _match(self, embeddings: torch.Tensor, local: torch.Tensor | None) -> torch.Tensor:
        """(G,) Hamming distances minus n of the IMLE matchings of G graph pairs from (2G, n, F) embeddings
        (view 1's graphs, then view 2's)."""
        num_graphs, num_nodes = embeddings.shape[0] // 2, embeddings.shape[1]
        adjacency = knn_edges(embeddings, self.num_neighbors)
        nodes = embeddings if self.gcn is None else self.gcn(embeddings, adjacency)
        unary = global_affinity(self._observed(nodes, "vertex"), self.vertex_centring)
        if local is not None:
            unary = torch.lerp(local, unary, self.alpha)  # alpha * global + (1 - alpha) * local
        if self.second_order:
            # a symmetric kNN graph has at most 2 n k directed edges: a fixed width needs no host sync
            width = 2 * num_nodes * min(self.num_neighbors, num_nodes - 1)
            edges = pad_edges(adjacency, width)
            incidence = incidence_rows(edges, num_nodes, unary.dtype)
            # (2G, 1, 1) edges per graph, each >= 2: only the softening and the degree normalisation read them
            needs_counts = self.edge_softening > 0 or self.edge_normalisation == "degree"
            edge_counts = adjacency.sum((1, 2), keepdim=True, dtype=unary.dtype) if needs_counts else None
            pairwise = edge_affinity(self._observed(nodes, "edge"), incidence, self.edge_softening, edge_counts)
            pairwise = self._weighted_edges(pairwise, edge_counts, num_nodes)
            edges1, edges2 = edges.chunk(2)
            solver = self.solver
        else:
            edges1 = edges2 = unary.new_zeros((num_graphs, 0, 2), dtype=torch.long)
            pairwise = unary.new_zeros((num_graphs, 0, 0))
            solver = _linear_assignment_solver
        problem = QAPBatch(unary=unary, edges1=edges1, edges2=edges2, pairwise=pairwise)
        state = IMLEState()
        self._states.append(state)
        # the Hamming distance is linear in the matching, <1 - 2 I, x> + n: its IMLE target is solved in the
        # forward, in the same solver call
        cost = self._hamming_cost(num_nodes, unary)
        return imle_linear_loss(problem, solver, cost, self.lambda_, self.noise, self.noise_scale, self.margin,
                                self.num_samples, state=state, noise_reference=self.noise_reference)

    def _hamming_cost(self, num_nodes: int, like: torch.Tensor) -> torch.Tensor:
        """(n, n) ``1 - 2 I``, kept per size, device and dtype (two operator calls fewer per step)."""
        key = (num_nodes, like.device, like.dtype)
        if key not in self._hamming_costs:
            self._hamming_costs[key] = like.new_ones((num_nodes, num_nodes)).fill_diagonal_(-1.0)
        return self._hamming_costs[key]

    def _weighted_edges(self, pairwise: torch.Tensor, edge_counts: torch.Tensor | None, num_nodes: int) -> torch.Tensor:
        """(G, E, E) edge affinities times ``edge_weight``, divided by the mean directed degree of each graph pair
        (``edge_counts``: (2G, 1, 1) edges of view 1's graphs, then view 2's) with ``edge_normalisation="degree"``."""
        if self.edge_normalisation == "none":
            return pairwise if self.edge_weight == 1.0 else self.edge_weight * pairwise
        # mean degree of a pair = (edges of view 1 + edges of view 2) / 2n
        scale = edge_counts.view(2, -1, 1, 1).sum(0).reciprocal_().mul_(2 * num_nodes * self.edge_weight)
        return pairwise * scale

    def _observed(self, tensor: torch.Tensor, path: str) -> torch.Tensor:
        """``tensor`` as it enters one path of the objective; the squared norm of the gradient that reaches it through
        that path is kept (a tensor: no host sync) for ``last_gradient_norms``."""
        if not (self.track_gradient_paths and tensor.requires_grad):
            return tensor
        alias = tensor.view_as(tensor)
        kept = self._path_gradients[path]
        alias.register_hook(lambda gradient: kept.append(torch.linalg.vector_norm(gradient)))
        return alias

    @property
    def last_gradient_norms(self) -> dict[str, torch.Tensor]:
        """L2 norm of the gradient the last backward sent through each path, 0-dim tensors (NaN where none passed
        or ``track_gradient_paths`` was off):

        - ``vertex``: through the global vertex affinity, at the vertex embeddings (GCN outputs, both views);
        - ``edge``: through the edge affinities, at the same embeddings;
        - ``local``: through the local affinity, at the encoder's feature maps (both views).

        The vertex and edge norms are taken at the same tensor, so their ratio says which term drives the
        embeddings; the local one is at the feature maps (another tensor, other units).
        """
        norms = {}
        for path in _GRADIENT_PATHS:
            kept = self._path_gradients.get(path, [])
            norms[path] = torch.linalg.vector_norm(torch.stack(kept)) if kept else torch.tensor(float("nan"))
        return norms

    @property
    def last_gradient_is_zero(self) -> torch.Tensor:
        """1.0 when the last step's IMLE gradient was exactly zero everywhere (the perturbed and target matchings
        agreed in every graph: no learning signal from that step), else 0.0; NaN before any solve."""
        share = self.last_gradient_nonzero_share
        return torch.where(share.isnan(), share, (share == 0).float())

    @property
    def last_match_accuracy(self) -> torch.Tensor:
        """Share of images whose first view was matched to its own second view in the last forward (NaN before), a
        0-dim tensor on the objective's device."""
        if self._hamming_total is None:
            return torch.tensor(float("nan"))
        return 1.0 - self._hamming_total / (2 * self._num_images)

    @property
    def last_gradient_nonzero_share(self) -> torch.Tensor:
        """Share of non-zero entries of the IMLE gradient on the vertex affinities in the last step.

        Zero means the perturbed and target matchings agreed everywhere: no learning signal.
        """
        return self._share_of_states(lambda state: (state.matching != state.target_matching).flatten())

    @property
    def last_target_differs_share(self) -> torch.Tensor:
        """Share of the last step's IMLE target matchings that differ from the true one.

        Near 1 when lambda_ is too small to pull the target to the truth; 0 when lambda_ saturates
        (every target is the true matching and the gradient is (x - I) / lambda_ whatever lambda_).
        """
        def differs(state: IMLEState) -> torch.Tensor:
            target = state.target_matching
            identity = torch.eye(target.shape[1], dtype=target.dtype, device=target.device)
            return (target != identity).flatten(1).any(1)

        return self._share_of_states(differs)

    def _share_of_states(self, flags: Callable[[IMLEState], torch.Tensor]) -> torch.Tensor:
        """Mean of per-state boolean flags over the last step's states (NaN before any solve), a 0-dim tensor on the
        objective's device: reading it is the caller's device-to-host synchronisation (``ObjectiveStats`` reads
        once per epoch)."""
        values = [flags(state) for state in self._states if state.target_matching is not None]
        if not values:
            return torch.tensor(float("nan"))
        return torch.cat(values).float().mean()

    def _local_affinity(
        self,
        features1: torch.Tensor,
        features2: torch.Tensor,
        grid1: torch.Tensor,
        grid2: torch.Tensor,
        num_graphs: int,
    ) -> torch.Tensor:
        """(G, n, n) local affinities of (G*n, D, R, S) feature maps and (G*n, R, S, 2) grids."""
        features1, grid1 = self._pool(self._observed(features1, "local"), grid1)
        features2, grid2 = self._pool(self._observed(features2, "local"), grid2)
        box2 = grid_box(grid2).reshape(num_graphs, -1, 4)
        cells = lambda maps: maps.reshape(num_graphs, -1, maps.shape[1], maps.shape[2] * maps.shape[3])  # noqa: E731
        centres = lambda grid: grid.reshape(num_graphs, -1, grid.shape[1] * grid.shape[2], 2)  # noqa: E731
        return local_affinity(cells(features1), cells(features2), centres(grid1), centres(grid2), box2,
                              self.local_num_matches)

    def _pool(self, features: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature map and grid average-pooled to at most local_grid_size cells per side (unchanged if within)."""
        size = self.local_grid_size
        if size is None or max(features.shape[2:]) <= size:
            return features, grid
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
        if not self.local_similarity:
            _check_finite(embeddings1=embeddings1, embeddings2=embeddings2)
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
        _check_finite(embeddings1=embeddings1, embeddings2=embeddings2, features1=features1, features2=features2)


def _as_float32(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """float32 copy of a tensor of another dtype (no operator call when it already is float32)."""
    return tensor if tensor is None or tensor.dtype == torch.float32 else tensor.float()


def _check_finite(**tensors: torch.Tensor) -> None:
    """Raises naming the first tensor with NaN or Inf values; one device-to-host synchronisation when all are finite."""
    # the largest magnitude of a tensor is finite exactly when all its values are (NaN propagates)
    finite = torch.stack([torch.linalg.vector_norm(value, ord=torch.inf) for value in tensors.values()]).isfinite()
    if not bool(finite.all()):
        name = list(tensors)[int(finite.logical_not().nonzero()[0])]
        raise ValueError(f"{name} holds NaN or Inf values.")


def _linear_assignment_solver(problem: QAPBatch) -> torch.Tensor:
    """Vertex-to-vertex matching only, for the no-second-order ablation."""
    return linear_assignment(problem.unary)

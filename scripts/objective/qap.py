"""Batched quadratic assignment (graph matching) solver, torch tensors in and out.

LVM-Med's second-order objective matches two graphs of n nodes each by maximising, over permutation
matrices X (n x n, every row and column sums to 1),

    score(X) = sum_{i,a} unary[i, a] X[i, a] + sum_{e,f} pairwise[e, f] X[i_e, a_f] X[j_e, b_f]

for directed edges e = (i_e, j_e) of graph 1 and f = (a_f, b_f) of graph 2.

Graphs with n <= ``exact_max_nodes`` are solved exactly by enumerating all n! permutations. Larger ones
get an iterated local search that works on the edge lists only (never the dense n^2 x n^2 affinity
matrix). It starts from the linear assignment of the unary term, from the spectral relaxation of
Leordeanu & Hebert ("A spectral technique for correspondence problems using pairwise constraints",
ICCV 2005) and from linear assignments of randomly perturbed unary terms. Each start climbs by best-improvement 2-swaps and, at a swap
optimum, by the integer fixed-point step of IPFP (Leordeanu, Hebert & Sukthankar, "An integer projected
fixed point method for graph matching and MAP inference", NIPS 2009): the assignment maximising the
score's gradient. Both cost O(E1 * n) per step. At a local optimum of both, a few random swaps perturb
the start's best permutation, and the climb goes on. All starts of a batch climb together, one step at a time
for all of them, so that a step is a fixed handful of tensor operations; starts that have stopped leave
the batch. ``python -m benchmarks.solver`` measures it (``docs/performance.md``).

Written by hand rather than taken from pygmtools, which would be a dependency with its own backends, needs
the dense n^2 x n^2 affinity matrix and is slower here (3-4x at n=16, 6-9x at n=32 against RRWM + Hungarian);
scipy's ``linear_sum_assignment`` does the assignment steps on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["QAPBatch", "qap_score", "edge_matches", "linear_assignment", "GraphMatchingSolver"]

_CHUNK_ELEMENTS = 1 << 23  # gathered affinities per enumeration chunk (64 MB in float64)
_MAX_EXACT_NODES = 9  # 9! permutations already need a ~100 MB index table
_LAP_LIMIT = 1e300  # scipy's assignment needs finite costs; larger magnitudes are clipped
_POWER_ITERATIONS = 5
_KICK_SWAPS = 3  # random transpositions that perturb a local optimum
_START_NOISE = 0.4  # Gumbel scale of the random starts, in mean absolute deviations of the unary
_PATIENCE = 3  # local optima in a row that do not improve a start's best before it stops


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{tuple(value.shape)} {value.dtype} on {value.device}"
    return type(value).__name__


@dataclass(frozen=True)
class QAPBatch:
    """B graph matching problems between graphs of n nodes each.

    unary: (B, n, n) float, affinity of node i of graph 1 with node a of graph 2.
    edges1: (B, E1, 2) long, directed edges (i, j) of graph 1.
    edges2: (B, E2, 2) long, directed edges (a, b) of graph 2.
    pairwise: (B, E1, E2), unary's dtype, affinity of edge e of graph 1 with edge f of graph 2.

    Shorter edge lists are padded with rows (0, 0). Self-loop rows count as padding: their pairwise
    rows and columns are ignored everywhere. All tensors share one device.
    """

    unary: Tensor
    edges1: Tensor
    edges2: Tensor
    pairwise: Tensor

    def __post_init__(self) -> None:
        u = self.unary
        if not isinstance(u, Tensor) or u.dim() != 3 or u.shape[1] != u.shape[2] or u.shape[1] < 1:
            raise ValueError(f"unary must be (B, n, n) with n >= 1, got {_describe(u)}")
        if not u.is_floating_point():
            raise ValueError(f"unary must be floating point, got {_describe(u)}")
        batch, n = u.shape[:2]
        for name in ("edges1", "edges2"):
            edges = getattr(self, name)
            if not isinstance(edges, Tensor) or edges.dim() != 3 or edges.shape[0] != batch or edges.shape[2] != 2:
                raise ValueError(f"{name} must be (B, E, 2) with B={batch}, got {_describe(edges)}")
            if edges.dtype != torch.long or edges.device != u.device:
                raise ValueError(f"{name} must be torch.long on {u.device}, got {_describe(edges)}")
            if bool(((edges < 0) | (edges >= n)).any()):
                raise ValueError(f"{name} must hold node indices in [0, {n}), got {_describe(edges)}")
        w = self.pairwise
        expected = (batch, self.edges1.shape[1], self.edges2.shape[1])
        if not isinstance(w, Tensor) or tuple(w.shape) != expected:
            raise ValueError(f"pairwise must be (B, E1, E2) = {expected}, got {_describe(w)}")
        if w.dtype != u.dtype or w.device != u.device:
            raise ValueError(f"pairwise must be {u.dtype} on {u.device} like unary, got {_describe(w)}")


def _real_edge_pairs(problem: QAPBatch) -> Tensor:
    """(B, E1, E2) bool: True where both edges are real (not self-loop padding)."""
    real1 = problem.edges1[..., 0] != problem.edges1[..., 1]
    real2 = problem.edges2[..., 0] != problem.edges2[..., 1]
    return real1[:, :, None] & real2[:, None, :]


def _masked_pairwise(problem: QAPBatch) -> Tensor:
    """(B, E1, E2) pairwise affinities with padding rows and columns set to zero."""
    return torch.where(_real_edge_pairs(problem), problem.pairwise, 0.0)


def _check_matching(problem: QAPBatch, matching: Tensor) -> None:
    if not isinstance(matching, Tensor) or matching.shape != problem.unary.shape:
        raise ValueError(f"matching must be {tuple(problem.unary.shape)}, got {_describe(matching)}")


def edge_matches(problem: QAPBatch, matching: Tensor) -> Tensor:
    """(B, E1, E2) Y[e, f] = X[i_e, a_f] * X[j_e, b_f] (zero on padding) for matchings X (B, n, n).

    score(X) = <unary, X> + <pairwise, Y>, so Y is the gradient of the score w.r.t. pairwise.
    """
    _check_matching(problem, matching)
    n, e1 = matching.shape[1], problem.edges1.shape[1]
    src, dst = problem.edges1.unbind(-1)  # (B, E1)
    head, tail = problem.edges2.unbind(-1)  # (B, E2)
    at_src = matching.gather(1, src[:, :, None].expand(-1, -1, n))  # (B, E1, n): X[i_e, :]
    at_dst = matching.gather(1, dst[:, :, None].expand(-1, -1, n))
    y = at_src.gather(2, head[:, None, :].expand(-1, e1, -1)) * at_dst.gather(2, tail[:, None, :].expand(-1, e1, -1))
    return torch.where(_real_edge_pairs(problem), y, 0.0)


def qap_score(problem: QAPBatch, matching: Tensor) -> Tensor:
    """(B,) scores of matchings X (B, n, n), 0/1 or relaxed; differentiable w.r.t. unary, pairwise and X."""
    _check_matching(problem, matching)
    linear = (problem.unary * matching).sum((1, 2))
    return linear + (problem.pairwise * edge_matches(problem, matching)).sum((1, 2))


def _lap_columns(scores: Tensor) -> Tensor:
    """(..., n, n) -> (..., n) long, same device: the column of each row in the assignment maximising the sum."""
    n = scores.shape[-1]
    costs = scores.detach().to("cpu", torch.float64).numpy().reshape(-1, n, n)
    costs = np.clip(np.nan_to_num(costs, nan=-_LAP_LIMIT), -_LAP_LIMIT, _LAP_LIMIT)
    columns = np.empty(costs.shape[:2], dtype=np.int64)
    for k, cost in enumerate(costs):
        columns[k] = linear_sum_assignment(cost, maximize=True)[1]
    return torch.from_numpy(columns).reshape(scores.shape[:-1]).to(scores.device)


def linear_assignment(unary: Tensor) -> Tensor:
    """(B, n, n) -> (B, n, n) permutation matrices maximising sum(unary * X), one scipy call per problem.

    NaN counts as -1e300 and magnitudes beyond 1e300 (infinities too) are clipped to it.
    """
    if not isinstance(unary, Tensor) or unary.dim() != 3 or unary.shape[1] != unary.shape[2]:
        raise ValueError(f"unary must be (B, n, n), got {_describe(unary)}")
    return F.one_hot(_lap_columns(unary), unary.shape[1]).to(unary.dtype)


@functools.lru_cache(maxsize=None)
def _permutation_tables(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """All n! permutations (n!, n) and, per permutation, its n(n-1)/2 entries in a flattened _pair_table."""
    perms = torch.from_numpy(np.array(list(itertools.permutations(range(n))), dtype=np.int64))
    first, second = torch.triu_indices(n, n, 1)
    index = torch.arange(first.numel()) * n * n + perms[:, first] * n + perms[:, second]
    return perms.to(device), index.to(device)


def _pair_table(problem: QAPBatch) -> Tensor:
    """(B, P * n * n), P = n(n-1)/2: for node pairs i < j and targets (a, c), the score of the edges between
    i and j when i -> a and j -> c, plus unary[i, a] on pair (i, i+1) and unary[n-1, c] on pair (n-2, n-1).
    A permutation scores the sum of its P entries. Needs n >= 2."""
    u = problem.unary
    batch, n = u.shape[:2]
    w = _masked_pairwise(problem)
    rows = problem.edges1[..., 0] * n + problem.edges1[..., 1]  # (B, E1)
    cols = problem.edges2[..., 0] * n + problem.edges2[..., 1]  # (B, E2)
    dense = u.new_zeros(batch, w.shape[1], n * n).scatter_add_(2, cols[:, None, :].expand_as(w), w)
    dense = u.new_zeros(batch, n * n, n * n).scatter_add_(1, rows[:, :, None].expand_as(dense), dense)
    dense = dense.view(batch, n, n, n, n)  # [i, j, a, c]: edge (i, j) matched to edge (a, c)
    table = dense + dense.permute(0, 2, 1, 4, 3)
    node = torch.arange(n - 1, device=u.device)
    table[:, node, node + 1] += u[:, :-1, :, None]
    table[:, n - 2, n - 1] += u[:, n - 1, None, :]
    first, second = torch.triu_indices(n, n, 1, device=u.device)
    return table[:, first, second].reshape(batch, -1)


def _enumerate(problem: QAPBatch) -> Tensor:
    """(B, n) optimal permutations, scoring all n! permutations in chunks; n >= 2."""
    u = problem.unary
    batch, n = u.shape[:2]
    perms, index = _permutation_tables(n, u.device)
    table = _pair_table(problem)
    pairs = index.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * pairs))
    best_score = torch.full((batch,), -torch.inf, dtype=u.dtype, device=u.device)
    best = torch.zeros(batch, dtype=torch.long, device=u.device)
    for start in range(0, perms.shape[0], chunk):
        rows = index[start : start + chunk]
        scores = table.index_select(1, rows.flatten()).view(batch, rows.shape[0], pairs).sum(-1)
        value, arg = scores.max(1)
        better = value > best_score
        best_score = torch.where(better, value, best_score)
        best = torch.where(better, arg + start, best)
    return perms.index_select(0, best)


class _SparseProblem:
    """Lookup tables of a QAPBatch built once per solve: the pairwise affinities padded with a zero column,
    graph 2's edge index of every node pair, and a rounding tolerance per problem. ``candidates`` spreads
    them over the candidate permutations of a search."""

    def __init__(self, problem: QAPBatch) -> None:
        u, w = problem.unary, _masked_pairwise(problem)
        batch, n = u.shape[:2]
        e1, e2 = w.shape[1:]
        device = u.device
        self.n = n
        self.unary, self.pairwise = u, w
        self.weights = F.pad(w, (0, 1))  # (B, E1, E2 + 1): column E2 (no edge) is zero
        self.src, self.dst = problem.edges1.unbind(-1)  # (B, E1)
        self.head, self.tail = problem.edges2.unbind(-1)  # (B, E2)
        lookup = torch.full((batch, n, n), e2, dtype=torch.long, device=device)  # [a, c] -> f of edge (a, c) or E2
        edge_ids = torch.arange(e2, device=device).expand(batch, -1)
        lookup.view(batch, n * n).scatter_(1, self.head * n + self.tail, edge_ids)
        lookup.diagonal(dim1=1, dim2=2).fill_(e2)  # padding rows (0, 0) are no edge
        self.lookup = lookup.view(batch * n, n)  # row b * n + a: edges (a, c) for all c
        self.lookup_t = lookup.transpose(1, 2).reshape(batch * n, n)  # row b * n + c: edges (a, c) for all a
        scale = torch.maximum(u.flatten(1).abs().amax(1), F.pad(w.flatten(1).abs(), (0, 1)).amax(1))
        self.tol = 4 * torch.finfo(u.dtype).eps * (n + e1) * scale  # (B,): score changes below are rounding

    def candidates(self, owner: Tensor) -> _Candidates:
        """The tables for K candidate permutations, candidate k belonging to problem owner[k]."""
        return _Candidates(self, owner)

    def _affinity(self, unary: Tensor, pairwise: Tensor, v: Tensor) -> Tensor:
        """M v for the symmetric affinity M = diag(unary) + K + K^T and v (B, n, n); O(E1 * E2)."""
        batch, e1, _ = pairwise.shape
        n = v.shape[1]
        rows, cols = (-1, -1, n), (-1, e1, -1)
        out = unary * v
        for to, source, to_end, source_end in (
            (self.src, self.dst, self.head, self.tail),
            (self.dst, self.src, self.tail, self.head),
        ):
            at = v.gather(1, source[..., None].expand(rows)).gather(2, source_end[:, None].expand(cols))
            by_edge = v.new_zeros(batch, e1, n).scatter_add_(2, to_end[:, None].expand(cols), pairwise * at)
            out.scatter_add_(1, to[..., None].expand(rows), by_edge)
        return out

    def spectral(self) -> Tensor:
        """(B, n, n) leading eigenvector of M by power iteration from ones. M is shifted by a Gershgorin
        bound s of its negative part N: M + sI = P + (sI - N) with sI - N PSD, so no eigenvalue beats the
        top one in magnitude (and s = 0 for non-negative affinities)."""
        ones = torch.ones_like(self.unary)
        negative = self._affinity((-self.unary).clamp_min(0), (-self.pairwise).clamp_min(0), ones)
        shift = negative.flatten(1).amax(1)[:, None, None]
        v = ones
        for _ in range(_POWER_ITERATIONS):
            v = self._affinity(self.unary, self.pairwise, v) + shift * v
            v = v / v.flatten(1).abs().amax(1).clamp_min(torch.finfo(v.dtype).tiny)[:, None, None]
        return v


class _Candidates:
    """K candidate permutations (rows of a (K, n) tensor, node i -> perms[k, i]) of the problems of a
    _SparseProblem, with that problem's tables gathered once per candidate. Scores cost O(n + E1) and
    gradients with all 2-swap gains O(E1 * n + n^2) per candidate, in a fixed handful of tensor operations
    on all K at once: the search is bound by the number of operations per step, not by arithmetic."""

    def __init__(self, problem: _SparseProblem, owner: Tensor) -> None:
        n, k = problem.n, owner.numel()
        self.n = n
        self.lookup, self.lookup_t = problem.lookup, problem.lookup_t
        self.src, self.dst = problem.src.index_select(0, owner), problem.dst.index_select(0, owner)  # (K, E1)
        e1 = self.src.shape[1]
        self.weights = problem.weights.index_select(0, owner)  # (K, E1, E2 + 1), column E2 (no edge) is zero
        self.row_base = owner[:, None] * n  # (K, 1): first lookup row of each candidate's problem
        self.unary = problem.unary.index_select(0, owner)  # (K, n, n)
        self.tol = problem.tol.index_select(0, owner)  # (K,)
        self.rows = (k, e1, n)
        first_row = torch.arange(k, device=owner.device)[:, None] * n  # rows of the (K * n, n) gradient
        self.src_rows, self.dst_rows = (first_row + self.src).flatten(), (first_row + self.dst).flatten()
        self.node_pairs = torch.cat([self.src * n + self.dst, self.dst * n + self.src], 1)  # (K, 2 E1)

    def _edge_weights(self, head: Tensor, tail: Tensor) -> Tensor:
        """(K, E1): pairwise[e, f] for f = edge (head[k, e], tail[k, e]) of graph 2 (0 when no edge)."""
        f = self.lookup.view(-1).take((self.row_base + head) * self.n + tail)
        return self.weights.gather(2, f[..., None]).squeeze(2)

    def score(self, perms: Tensor) -> Tensor:
        """(K,) scores of the candidates."""
        linear = self.unary.gather(2, perms[..., None]).sum((1, 2))
        return linear + self._edge_weights(perms.gather(1, self.src), perms.gather(1, self.dst)).sum(1)

    def gradient_and_swap_gains(self, perms: Tensor) -> tuple[Tensor, Tensor]:
        """(K, n, n) score gradients w.r.t. X at the candidates, and (K, n, n) gains[k, i, j]: the score
        change of swapping the targets of nodes i and j."""
        k, n = perms.shape
        head, tail = perms.gather(1, self.src), perms.gather(1, self.dst)
        # G[i_e, c] += w[e, (c, p[j_e])] and G[j_e, c] += w[e, (p[i_e], c)]
        into_src = self.lookup_t.index_select(0, (self.row_base + tail).flatten()).view(self.rows)
        into_dst = self.lookup.index_select(0, (self.row_base + head).flatten()).view(self.rows)
        from_src, from_dst = self.weights.gather(2, into_src), self.weights.gather(2, into_dst)
        grad = self.unary.clone()
        grad.view(k * n, n).index_add_(0, self.src_rows, from_src.view(-1, n)).index_add_(0, self.dst_rows, from_dst.view(-1, n))
        # the first-order gain counts an edge between the swapped nodes as -2 * old; the truth is new - old
        between = from_dst.gather(2, tail[..., None]).squeeze(2) + self._edge_weights(tail, head)
        fix = grad.new_zeros(k, n * n).scatter_add_(1, self.node_pairs, torch.cat([between, between], 1))
        at = grad.gather(2, perms[:, None, :].expand(-1, n, -1))  # at[i, j] = G[i, p[j]]
        own = at.diagonal(dim1=1, dim2=2)
        return grad, at + at.mT - own[:, :, None] - own[:, None, :] + fix.view(k, n, n)


def _transpose(perms: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """Permutations (K, n) with their entries at positions first and second (K, 1) exchanged."""
    return perms.scatter(1, first, perms.gather(1, second)).scatter(1, second, perms.gather(1, first))


@contextlib.contextmanager
def _single_threaded(device: torch.device) -> Iterator[None]:
    """Runs torch's CPU operations on one thread. The local search is many operations on tensors of a few
    thousand entries, where waking intra-op threads costs more than it saves (and, on a busy machine,
    waiting for them costs up to 10x the work)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class GraphMatchingSolver:
    """Maximises score(X) over permutation matrices for each problem of a QAPBatch.

    Returns (B, n, n) permutation matrices in unary's dtype and device, without autograd graph.
    n <= exact_max_nodes (at most 9): exact, by enumeration. Otherwise iterated local search from
    2 + random_starts starts per problem (LAP of the unary, spectral, LAPs of the unary perturbed by Gumbel
    noise). Each step takes the best improving 2-swap or, when there is none, the IPFP jump to the LAP of the
    gradient if it improves. At a local optimum of both, the start goes on from its best permutation perturbed by 3 random swaps, until
    that fails to improve it 3 times in a row or it has taken max_iterations steps; the best start wins.
    All starts of all problems advance together, one batched step at a time (on one thread on a CPU).
    seed seeds the solver's generator for the random starts and perturbations (None: random).
    """

    def __init__(
        self, exact_max_nodes: int = 8, random_starts: int = 2, max_iterations: int = 50, seed: int | None = None
    ) -> None:
        for name, value in (
            ("exact_max_nodes", exact_max_nodes),
            ("random_starts", random_starts),
            ("max_iterations", max_iterations),
            ("seed", 0 if seed is None else seed),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if exact_max_nodes > _MAX_EXACT_NODES:
            raise ValueError(f"exact_max_nodes must be at most {_MAX_EXACT_NODES} (n!), got {exact_max_nodes}")
        self.exact_max_nodes = exact_max_nodes
        self.random_starts = random_starts
        self.max_iterations = max_iterations
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    @torch.no_grad()
    def __call__(self, problem: QAPBatch) -> Tensor:
        u = problem.unary
        batch, n = u.shape[:2]
        if n == 1:
            perms = torch.zeros(batch, 1, dtype=torch.long, device=u.device)
        elif n <= self.exact_max_nodes:
            perms = _enumerate(problem)
        else:
            with _single_threaded(u.device):
                perms = self._local_search(_SparseProblem(problem))
        return F.one_hot(perms, n).to(u.dtype)

    def _random_ints(self, low: int, high: int, size: tuple[int, ...], device: torch.device) -> Tensor:
        return torch.randint(low, high, size, generator=self._generator).to(device)

    def _random_starts(self, problem: _SparseProblem) -> Tensor:
        """(B, random_starts, n) LAPs of the unary perturbed by Gumbel noise of a fifth of its spread: diverse
        starts that, unlike uniformly random permutations, need only a few swaps to reach a local optimum."""
        u = problem.unary
        batch, n = u.shape[:2]
        uniform = torch.rand(batch, self.random_starts, n, n, generator=self._generator, dtype=u.dtype)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-7))).to(u.device)
        spread = (u - u.mean((1, 2), keepdim=True)).abs().mean((1, 2))[:, None, None, None]
        return _lap_columns(u[:, None] + _START_NOISE * spread * gumbel)

    def _perturbations(self, steps: int, count: int, n: int, device: torch.device) -> Tensor:
        """(steps, count, n) index permutations, each the product of 3 random transpositions."""
        identity = torch.arange(n, device=device).expand(steps * count, n)
        first = self._random_ints(0, n, (_KICK_SWAPS, steps * count, 1), device)
        second = (first + self._random_ints(1, n, first.shape, device)) % n
        for swap in range(_KICK_SWAPS):
            identity = _transpose(identity, first[swap], second[swap])
        return identity.view(steps, count, n)

    def _local_search(self, problem: _SparseProblem) -> Tensor:
        """(B, n) best permutation found per problem; n >= 2."""
        batch, n = problem.unary.shape[:2]
        device = problem.unary.device
        starts = [_lap_columns(problem.unary)[:, None], _lap_columns(problem.spectral())[:, None]]
        perms = torch.cat([*starts, self._random_starts(problem)], 1).flatten(0, 1)  # (K, n), K = B * S
        owner = torch.arange(batch, device=device).repeat_interleave(perms.shape[0] // batch)
        search = problem.candidates(owner)
        kicks = self._perturbations(self.max_iterations, owner.numel(), n, device)
        # row i * n + j: the index permutation that swaps the targets of nodes i and j (i < j)
        pairs = torch.ones(n, n, dtype=torch.bool, device=device).triu(1).flatten().nonzero().squeeze(1)
        swaps = _transpose(torch.arange(n, device=device).expand(pairs.numel(), n), (pairs // n)[:, None],
                           (pairs % n)[:, None])
        scores = search.score(perms)
        best, best_scores = perms, scores
        improved = torch.ones_like(owner, dtype=torch.bool)  # best improved since the last local optimum
        failures = torch.zeros_like(owner)  # local optima in a row that did not improve the best
        found = best.clone()  # (K, n): best permutation of every start, written back when it leaves the search
        ids = torch.arange(owner.numel(), device=device)  # start of each candidate still in the search
        for step in range(self.max_iterations):
            searching = failures < _PATIENCE
            active = int(searching.sum())
            if active == 0:
                break
            if active <= ids.numel() // 2:  # drop finished starts: each step costs O(candidates)
                found.index_copy_(0, ids, best)
                keep = searching.nonzero().squeeze(1)
                perms, scores, best, best_scores, improved, failures, ids = (
                    t.index_select(0, keep) for t in (perms, scores, best, best_scores, improved, failures, ids)
                )
                searching, kicks = searching.index_select(0, keep), kicks.index_select(1, keep)
                search = problem.candidates(owner.index_select(0, ids))
            grad, gains = search.gradient_and_swap_gains(perms)
            swap_gain, swap = gains.flatten(1).index_select(1, pairs).max(1)
            use_swap = searching & (swap_gain > search.tol)
            stuck = (searching & ~use_swap).nonzero().squeeze(1)
            use_jump = torch.zeros_like(use_swap)
            if stuck.numel():
                jumps = perms.index_copy(0, stuck, _lap_columns(grad.index_select(0, stuck)))
                jump_scores = search.score(jumps)
                use_jump = (jump_scores - scores > search.tol) & searching & ~use_swap
                perms = torch.where(use_jump[:, None], jumps, perms)
                scores = torch.where(use_jump, jump_scores, scores)
            perms = torch.where(use_swap[:, None], perms.gather(1, swaps.index_select(0, swap)), perms)
            scores = torch.where(use_swap, scores + swap_gain, scores)  # the gain is the exact change
            better = scores > best_scores
            best = torch.where(better[:, None], perms, best)
            best_scores = torch.where(better, scores, best_scores)
            local = searching & ~(use_swap | use_jump)
            rising = improved | better
            failures = torch.where(local, torch.where(rising, 0, failures + 1), failures)
            improved = rising & ~local
            # iterated local search: a start at a local optimum goes on from its best permutation, perturbed
            kick = local & (failures < _PATIENCE)
            if bool(kick.any()):
                kicked = best.gather(1, kicks[step])
                perms = torch.where(kick[:, None], kicked, perms)
                scores = torch.where(kick, search.score(kicked), scores)
        found.index_copy_(0, ids, best)
        best, search = found, problem.candidates(owner)
        # rescored: the running scores add up swap gains and carry their rounding
        choice = search.score(best).view(batch, -1).argmax(1)
        return best.view(batch, -1, n).gather(1, choice.view(-1, 1, 1).expand(-1, 1, n)).squeeze(1)

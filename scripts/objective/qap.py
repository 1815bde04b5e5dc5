"""Batched quadratic assignment (graph matching) solver: torch tensors in and out, compiled search inside.

LVM-Med's second-order objective matches two graphs of n nodes each by maximising, over permutation
matrices X (n x n, every row and column sums to 1),

    score(X) = sum_{i,a} unary[i, a] X[i, a] + sum_{e,f} pairwise[e, f] X[i_e, a_f] X[j_e, b_f]

for directed edges e = (i_e, j_e) of graph 1 and f = (a_f, b_f) of graph 2.

One solver call copies a whole batch to the host once (one float64 array), solves every problem there in
numba-compiled code and copies the permutations back once: a fixed handful of torch operations and one
device-to-host synchronisation per call, whatever the batch or the search does. The problems are many and
small (n = 16, about 100 directed edges), so a batched search on the device would be bound by kernel launches and by
the host round trips of its stopping tests; compiled code runs each problem's search without either.

Graphs with n <= ``exact_max_nodes`` are solved exactly, by a depth-first enumeration of all n!
permutations. Larger ones get an iterated local search on the edge lists (never the dense n^2 x n^2
affinity matrix). It starts from the linear assignment of the unary term, from the spectral relaxation of
Leordeanu & Hebert ("A spectral technique for correspondence problems using pairwise constraints", ICCV
2005) and from linear assignments of unary terms perturbed by Gumbel noise. Each start climbs by
best-improvement 2-swaps and, at a swap optimum, by the integer fixed-point step of IPFP (Leordeanu, Hebert
& Sukthankar, "An integer projected fixed point method for graph matching and MAP inference", NIPS 2009):
the assignment maximising the score's gradient. At a local optimum of both, a few random swaps perturb the
start's best permutation and the climb goes on, until that fails to improve it a few times in a row. A swap
updates the gradient and the swap gains' corrections incrementally (only the edges at the two swapped nodes
change them); starts that repeat an earlier start are skipped. All arithmetic is float64, whatever the
input dtype.
``python -m benchmarks.solver`` measures it against pygmtools' RRWM and ``python -m
benchmarks.objective_profile`` counts what one objective step costs (``docs/performance.md``).

Written by hand rather than taken from pygmtools, which needs the dense n^2 x n^2 affinity matrix and runs
many small tensor operations per problem. The linear assignments are a hand-written shortest augmenting path
(Hungarian) method because scipy's ``linear_sum_assignment`` cannot be called from numba-compiled code.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit
from torch import Tensor

__all__ = ["QAPBatch", "qap_score", "edge_selection", "edge_pair_matches", "edge_matches", "linear_assignment", "GraphMatchingSolver"]

_MAX_EXACT_NODES = 9  # 9! = 362,880 permutations per problem; n! grows tenfold per node beyond
_VALUE_LIMIT = 1e300  # NaN counts as -1e300 and larger magnitudes are clipped: sums of a few hundred stay finite
_POWER_ITERATIONS = 5
_KICK_SWAPS = 3  # random transpositions that perturb a local optimum
_START_NOISE = 0.4  # Gumbel scale of the random starts, in mean absolute deviations of the unary
_PATIENCE = 3  # local optima in a row that do not improve a start's best before it stops
_ROUNDING = 4 * float(np.finfo(np.float64).eps)  # score changes below this x (n + E1) x magnitude are rounding


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{tuple(value.shape)} {value.dtype} on {value.device}"
    return type(value).__name__


def _check_node_indices(name: str, edges: np.ndarray, n: int) -> None:
    if edges.size and (edges.min() < 0 or edges.max() >= n):
        raise ValueError(f"{name} must hold node indices in [0, {n}), got values in [{edges.min()}, {edges.max()}]")


@dataclass(frozen=True)
class QAPBatch:
    """B graph matching problems between graphs of n nodes each.

    unary: (B, n, n) float, affinity of node i of graph 1 with node a of graph 2.
    edges1: (B, E1, 2) long, directed edges (i, j) of graph 1.
    edges2: (B, E2, 2) long, directed edges (a, b) of graph 2.
    pairwise: (B, E1, E2), unary's dtype, affinity of edge e of graph 1 with edge f of graph 2.

    Shorter edge lists are padded with rows (0, 0). Self-loop rows count as padding: their pairwise
    rows and columns are ignored everywhere. All tensors share one device. Building a batch checks shapes,
    dtypes and devices only, with no operator call (none waits for the device); node indices are checked by
    the solver on its host copy, on every device.
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
        batch = u.shape[0]
        for name in ("edges1", "edges2"):
            edges = getattr(self, name)
            if not isinstance(edges, Tensor) or edges.dim() != 3 or edges.shape[0] != batch or edges.shape[2] != 2:
                raise ValueError(f"{name} must be (B, E, 2) with B={batch}, got {_describe(edges)}")
            if edges.dtype != torch.long or edges.device != u.device:
                raise ValueError(f"{name} must be torch.long on {u.device}, got {_describe(edges)}")
        w = self.pairwise
        expected = (batch, self.edges1.shape[1], self.edges2.shape[1])
        if not isinstance(w, Tensor) or tuple(w.shape) != expected:
            raise ValueError(f"pairwise must be (B, E1, E2) = {expected}, got {_describe(w)}")
        if w.dtype != u.dtype or w.device != u.device:
            raise ValueError(f"pairwise must be {u.dtype} on {u.device} like unary, got {_describe(w)}")


def _check_matching(problem: QAPBatch, matching: Tensor) -> None:
    if not isinstance(matching, Tensor) or matching.shape != problem.unary.shape:
        raise ValueError(f"matching must be {tuple(problem.unary.shape)}, got {_describe(matching)}")


def edge_selection(edges: Tensor, num_nodes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot rows of every edge's source and target vertex: (..., E, 2) long -> (..., 2, E, n).

    ``[..., 0, e, :]`` is 1 at edge e's source, ``[..., 1, e, :]`` at its target; padding (self-loop) edges get
    zero rows and select nothing. Target rows minus source rows are the graph's incidence matrix.
    """
    real = (edges.diff(dim=-1) != 0).unsqueeze(-1).to(dtype)  # (..., E, 1, 1)
    # scatter rather than F.one_hot, which checks the indices' range with device-to-host syncs on the CPU
    one_hot = edges.new_zeros((*edges.shape, num_nodes), dtype=dtype).scatter_(-1, edges.unsqueeze(-1), 1.0)
    return (one_hot * real).transpose(-3, -2)


def edge_pair_matches(selection1: Tensor, selection2: Tensor, matching: Tensor) -> Tensor:
    """Y[e, f] = X[i_e, a_f] * X[j_e, b_f] of c x B matchings X of B problems' edges.

    Args:
        selection1: (B, 2, E1, n) ``edge_selection`` of graph 1's edges.
        selection2: (B, 2, E2, n) same for graph 2.
        matching: (c * B, n, n) matchings, 0/1 or relaxed: c copies of the B problems, copy-major.

    Returns:
        (c * B, E1, E2), zero on padding; differentiable w.r.t. the matching.
    """
    batch, _, _, n = selection1.shape
    copies = matching.reshape(-1, batch, 1, n, n)
    # (sources of 1) X (sources of 2)^T and (targets of 1) X (targets of 2)^T, multiplied
    both = selection1 @ copies @ selection2.transpose(-1, -2)  # (c, B, 2, E1, E2)
    return both.prod(2).flatten(0, 1)


def edge_matches(problem: QAPBatch, matching: Tensor) -> Tensor:
    """(B, E1, E2) Y[e, f] = X[i_e, a_f] * X[j_e, b_f] (zero on padding) for matchings X (B, n, n).

    score(X) = <unary, X> + <pairwise, Y>, so Y is the gradient of the score w.r.t. pairwise.
    """
    _check_matching(problem, matching)
    n, dtype = matching.shape[1], matching.dtype
    return edge_pair_matches(edge_selection(problem.edges1, n, dtype), edge_selection(problem.edges2, n, dtype), matching)


def qap_score(problem: QAPBatch, matching: Tensor) -> Tensor:
    """(B,) scores of matchings X (B, n, n), 0/1 or relaxed; differentiable w.r.t. unary, pairwise and X."""
    _check_matching(problem, matching)
    linear = (problem.unary * matching).sum((1, 2))
    return linear + (problem.pairwise * edge_matches(problem, matching)).sum((1, 2))


# ---------------------------------------------------------------------------------------------------------
# Compiled kernels. They take one problem's host arrays: unary (n, n) and pairwise (E1, E2) float64, edges1
# (E1, 2) and edges2 (E2, 2) int64. A permutation is an int64 array perm (n,): node i -> target perm[i].

_Tables = namedtuple(
    "_Tables",
    ["unary", "src", "dst", "lookup", "weights", "node_start", "node_edge",
     "out_start", "out_tail", "out_weights", "in_start", "in_head", "in_weights"],
)
_Tables.__doc__ = """One problem's sparse tables, padding dropped, duplicate edges of graph 2 merged, values finite.

unary (n, n); src, dst (M1,): graph 1's real edges m; node_edge[node_start[i]:node_start[i + 1]]: the edges at
node i, m where i = src[m] and m + M1 where i = dst[m]; lookup (n, n): k of graph 2's edge (a, c) or -1; weights (M1, K2): pairwise[m, k]. Graph 2's edges
grouped by head a, q in out_start[a]:out_start[a + 1]: their tails out_tail[q] and weights out_weights[:, q];
grouped by tail c, q in in_start[c]:in_start[c + 1]: in_head[q] and in_weights[:, q]."""


@njit(cache=True)
def _finite(value):  # pragma: no cover - compiled
    """NaN -> -1e300, magnitudes clipped to 1e300: every sum the search takes stays finite."""
    if value != value:
        return -_VALUE_LIMIT
    return min(max(value, -_VALUE_LIMIT), _VALUE_LIMIT)


@njit(cache=True)
def _finite_copy(values):  # pragma: no cover - compiled
    out = np.empty_like(values)
    flat_in, flat_out = values.reshape(-1), out.reshape(-1)
    for index in range(flat_in.size):
        flat_out[index] = _finite(flat_in[index])
    return out


@njit(cache=True)
def _group(keys, count, n):  # pragma: no cover - compiled
    """CSR grouping of items 0..count-1 by keys[item] in [0, n): (start (n + 1,), items (count,))."""
    start = np.zeros(n + 1, np.int64)
    for item in range(count):
        start[keys[item] + 1] += 1
    for key in range(n):
        start[key + 1] += start[key]
    items, fill = np.empty(count, np.int64), start[:-1].copy()
    for item in range(count):
        items[fill[keys[item]]] = item
        fill[keys[item]] += 1
    return start, items


@njit(cache=True)
def _edge_tables(unary, pairwise, edges1, edges2):  # pragma: no cover - compiled
    """The _Tables of one problem."""
    n = unary.shape[0]
    e1, e2 = pairwise.shape
    lookup = np.full((n, n), -1, np.int64)
    merged = np.full(e2, -1, np.int64)
    heads, tails = np.empty(e2, np.int64), np.empty(e2, np.int64)
    k2 = 0
    for f in range(e2):
        a, c = edges2[f, 0], edges2[f, 1]
        if a == c:
            continue
        if lookup[a, c] < 0:
            lookup[a, c] = k2
            heads[k2], tails[k2] = a, c
            k2 += 1
        merged[f] = lookup[a, c]
    rows = np.empty(e1, np.int64)
    m1 = 0
    for e in range(e1):
        if edges1[e, 0] != edges1[e, 1]:
            rows[m1] = e
            m1 += 1
    src, dst = np.empty(m1, np.int64), np.empty(m1, np.int64)
    weights = np.zeros((m1, k2))
    for m in range(m1):
        src[m], dst[m] = edges1[rows[m], 0], edges1[rows[m], 1]
        for f in range(e2):
            if merged[f] >= 0:
                weights[m, merged[f]] += _finite(pairwise[rows[m], f])
    ends = np.concatenate((src, dst))
    node_start, node_edge = _group(ends, 2 * m1, n)  # entry m + M1: edge m seen from its end dst[m]
    out_start, by_head = _group(heads, k2, n)
    in_start, by_tail = _group(tails, k2, n)
    out_weights, in_weights = np.empty((m1, k2)), np.empty((m1, k2))
    for m in range(m1):
        for q in range(k2):
            out_weights[m, q] = weights[m, by_head[q]]
            in_weights[m, q] = weights[m, by_tail[q]]
    return _Tables(_finite_copy(unary), src, dst, lookup, weights, node_start, node_edge,
                   out_start, tails[by_head], out_weights, in_start, heads[by_tail], in_weights)


@njit(cache=True)
def _assign(score, columns, real_work, int_work, used):  # pragma: no cover - compiled
    """columns[i] = the column of row i in the assignment maximising sum_i score[i, columns[i]] (n x n, finite).

    Shortest augmenting paths with row and column potentials (the O(n^3) Hungarian method in the form of
    Jonker & Volgenant, "A shortest augmenting path algorithm for dense and sparse linear assignment
    problems", Computing 1987), on costs -score. Work arrays: real_work (3, n + 1), int_work (2, n + 1),
    used (n + 1,).
    """
    n = score.shape[0]
    row_potential, column_potential, slack = real_work[0], real_work[1], real_work[2]
    row_of, previous = int_work[0], int_work[1]  # 1-based row matched to each column; path back-pointers
    row_potential[:] = 0.0
    column_potential[:] = 0.0
    row_of[:] = 0
    for row in range(1, n + 1):
        row_of[0] = row
        column = 0
        slack[:] = np.inf
        used[:] = False
        while True:
            used[column] = True
            current_row = row_of[column]
            delta = np.inf
            next_column = 0
            for j in range(1, n + 1):
                if not used[j]:
                    reduced = -score[current_row - 1, j - 1] - row_potential[current_row] - column_potential[j]
                    if reduced < slack[j]:
                        slack[j] = reduced
                        previous[j] = column
                    if slack[j] < delta:
                        delta = slack[j]
                        next_column = j
            for j in range(n + 1):
                if used[j]:
                    row_potential[row_of[j]] += delta
                    column_potential[j] -= delta
                else:
                    slack[j] -= delta
            column = next_column
            if row_of[column] == 0:
                break
        while column != 0:
            back = previous[column]
            row_of[column] = row_of[back]
            column = back
    for j in range(1, n + 1):
        columns[row_of[j] - 1] = j - 1


@njit(cache=True)
def _assign_batch(scores):  # pragma: no cover - compiled
    """(B, n, n) scores -> (B, n) columns of the assignments maximising each problem's sum."""
    batch, n = scores.shape[0], scores.shape[1]
    columns = np.zeros((batch, n), np.int64)
    real_work, int_work, used = np.empty((3, n + 1)), np.empty((2, n + 1), np.int64), np.empty(n + 1, np.bool_)
    for b in range(batch):
        _assign(_finite_copy(scores[b]), columns[b], real_work, int_work, used)
    return columns


@njit(cache=True)
def _score(perm, tables):  # pragma: no cover - compiled
    """score(X) of one permutation, O(n + M1)."""
    total = 0.0
    for i in range(perm.size):
        total += tables.unary[i, perm[i]]
    for m in range(tables.src.size):
        k = tables.lookup[perm[tables.src[m]], perm[tables.dst[m]]]
        if k >= 0:
            total += tables.weights[m, k]
    return total


@njit(cache=True)
def _derivatives(perm, tables, grad, fix):  # pragma: no cover - compiled
    """grad (n, n) = d score / d X at perm and fix (n, n), the swap-gain corrections of the edges between nodes
    i < j at fix[i, j] (see _swap). O(n^2 + M1 x degree of graph 2)."""
    grad[:] = tables.unary
    fix[:] = 0.0
    _update_edges(perm, tables.node_edge, 0, tables.node_edge.size, -1, -1, 1.0, tables, grad, fix)


@njit(cache=True)
def _swap(perm, i, j, tables, grad, fix):  # pragma: no cover - compiled
    """Exchanges the targets of nodes i and j and updates grad and fix: only the edges at i or j change them."""
    start, edges = tables.node_start, tables.node_edge
    for sign in (-1.0, 1.0):
        if sign > 0:
            perm[i], perm[j] = perm[j], perm[i]
        _update_edges(perm, edges, start[i], start[i + 1], i, -1, sign, tables, grad, fix)
        _update_edges(perm, edges, start[j], start[j + 1], j, i, sign, tables, grad, fix)


@njit(cache=True, inline="always")
def _update_edges(perm, edges, first, last, node, other, sign, tables, grad, fix):  # pragma: no cover - compiled
    """Adds sign x the gradient parts and swap-gain corrections of the edges m = edges[first:last] at node
    (-1: of both ends of every edge; entries m + M1 of node_edge are edge m seen from its end dst[m]).

    Edge m = (i, j) puts into row j the weights of graph 2's edges (perm[i], c), at columns c, and into row i
    those of edges (c, perm[j]): of an edge at node, only the part that depends on node's target changes.
    The first-order gain of swapping i and j counts the edge as -2 x old; the truth is new - old, so fix[i, j]
    adds old + new (its weight at its targets and at the swapped targets), once per edge (other: skip the
    edges to that node, already corrected)."""
    m1 = tables.src.size
    for q in range(first, last):
        from_src = edges[q] < m1
        m = edges[q] if from_src else edges[q] - m1
        s, d = tables.src[m], tables.dst[m]
        if from_src:  # the part of i's target
            out_of = perm[s]
            for r in range(tables.out_start[out_of], tables.out_start[out_of + 1]):
                grad[d, tables.out_tail[r]] += sign * tables.out_weights[m, r]
        else:  # the part of j's target
            into = perm[d]
            for r in range(tables.in_start[into], tables.in_start[into + 1]):
                grad[s, tables.in_head[r]] += sign * tables.in_weights[m, r]
        if (node < 0 and not from_src) or s == other or d == other:
            continue
        old, new = tables.lookup[perm[s], perm[d]], tables.lookup[perm[d], perm[s]]
        correction = 0.0
        if old >= 0:
            correction += tables.weights[m, old]
        if new >= 0:
            correction += tables.weights[m, new]
        fix[min(s, d), max(s, d)] += sign * correction


@njit(cache=True)
def _best_swap(perm, grad, fix):  # pragma: no cover - compiled
    """(gain, i, j) of the 2-swap (exchange the targets of nodes i < j) that raises the score most; exact."""
    n = perm.size
    best, first, second = -np.inf, 0, 1
    for i in range(n):
        own = grad[i, perm[i]]
        for j in range(i + 1, n):
            gain = grad[i, perm[j]] + grad[j, perm[i]] - own - grad[j, perm[j]] + fix[i, j]
            if gain > best:
                best, first, second = gain, i, j
    return best, first, second


@njit(cache=True)
def _affinity_product(tables, v, out):  # pragma: no cover - compiled
    """out = M v for the symmetric affinity M = diag(unary) + K + K^T, K[(i_m, a_k), (j_m, c_k)] = weights[m, k].

    O(n^2 + M1 * K2). Laid out for contiguous inner loops: v is gathered in graph 2's edge orders, edge
    products are summed per node of graph 1 over whole rows, then per node of graph 2 over its edges."""
    n, k2 = v.shape[0], tables.out_tail.size
    at_tail, at_head = np.empty((n, k2)), np.empty((n, k2))
    for i in range(n):
        for q in range(k2):
            at_tail[i, q] = v[i, tables.out_tail[q]]
            at_head[i, q] = v[i, tables.in_head[q]]
    into_head, into_tail = np.zeros((n, k2)), np.zeros((n, k2))
    for m in range(tables.src.size):
        i, j = tables.src[m], tables.dst[m]
        for q in range(k2):  # (i, a) gets the edges (a, c) of graph 2 times v[j, c]; (j, c) gets them times v[i, a]
            into_head[i, q] += tables.out_weights[m, q] * at_tail[j, q]
            into_tail[j, q] += tables.in_weights[m, q] * at_head[i, q]
    for i in range(n):
        for a in range(n):
            total = tables.unary[i, a] * v[i, a]
            for q in range(tables.out_start[a], tables.out_start[a + 1]):
                total += into_head[i, q]
            for q in range(tables.in_start[a], tables.in_start[a + 1]):
                total += into_tail[i, q]
            out[i, a] = total


@njit(cache=True)
def _negative_part_bound(tables):  # pragma: no cover - compiled
    """Largest row sum of N, the negative part of M (entries max(-x, 0)): a Gershgorin bound of its spectrum.
    Summed in _affinity_product's order."""
    n, k2 = tables.unary.shape[0], tables.out_tail.size
    into_head, into_tail = np.zeros((n, k2)), np.zeros((n, k2))
    for m in range(tables.src.size):
        i, j = tables.src[m], tables.dst[m]
        for q in range(k2):
            into_head[i, q] += max(-tables.out_weights[m, q], 0.0)
            into_tail[j, q] += max(-tables.in_weights[m, q], 0.0)
    bound = 0.0
    for i in range(n):
        for a in range(n):
            total = max(-tables.unary[i, a], 0.0)
            for q in range(tables.out_start[a], tables.out_start[a + 1]):
                total += into_head[i, q]
            for q in range(tables.in_start[a], tables.in_start[a + 1]):
                total += into_tail[i, q]
            bound = max(bound, total)
    return bound


@njit(cache=True)
def _spectral(tables):  # pragma: no cover - compiled
    """(n, n) leading eigenvector of M by power iteration from ones. M is shifted by a Gershgorin bound s of
    its negative part N: M + sI = P + (sI - N) with sI - N PSD, so no eigenvalue beats the top one in
    magnitude (and s = 0 for non-negative affinities)."""
    shift = _negative_part_bound(tables)
    v = np.ones_like(tables.unary)
    product = np.empty_like(v)
    for _ in range(_POWER_ITERATIONS):
        _affinity_product(tables, v, product)
        v = product + shift * v
        v /= max(np.abs(v).max(), np.finfo(np.float64).tiny)
    return v


@njit(cache=True)
def _starts(tables, random_starts, rng, real_work, int_work, used):  # pragma: no cover - compiled
    """(2 + random_starts, n) start permutations: the LAP of the unary, of the spectral relaxation and of the
    unary perturbed by Gumbel noise of a fraction of its spread (diverse starts that, unlike uniformly
    random permutations, need only a few swaps to reach a local optimum)."""
    unary = tables.unary
    n = unary.shape[0]
    starts = np.empty((2 + random_starts, n), np.int64)
    _assign(unary, starts[0], real_work, int_work, used)
    _assign(_spectral(tables), starts[1], real_work, int_work, used)
    scale = _START_NOISE * np.abs(unary - unary.mean()).mean()
    noisy = np.empty_like(unary)
    for r in range(random_starts):
        for i in range(n):
            for a in range(n):
                uniform = min(max(rng.random(), 1e-12), 1.0 - 1e-7)
                noisy[i, a] = unary[i, a] - scale * np.log(-np.log(uniform))
        _assign(noisy, starts[2 + r], real_work, int_work, used)
    return starts


@njit(cache=True)
def _repeats_a_row(rows, row):  # pragma: no cover - compiled
    """Whether rows[row] equals one of the rows before it."""
    for earlier in range(row):
        if (rows[earlier] == rows[row]).all():
            return True
    return False


@njit(cache=True)
def _local_search(tables, random_starts, max_iterations, rng, result):  # pragma: no cover - compiled
    """Writes into result (n,) the best permutation the iterated local search finds for one problem; n >= 2."""
    n = tables.unary.shape[0]
    magnitude = np.abs(tables.unary).max()
    if tables.weights.size:
        magnitude = max(magnitude, np.abs(tables.weights).max())
    tolerance = _ROUNDING * (n + tables.src.size) * magnitude  # score changes below are rounding
    real_work, int_work, used = np.empty((3, n + 1)), np.empty((2, n + 1), np.int64), np.empty(n + 1, np.bool_)
    grad, fix = np.empty((n, n)), np.empty((n, n))
    jump, best = np.empty(n, np.int64), np.empty(n, np.int64)
    result_score = -np.inf
    starts = _starts(tables, random_starts, rng, real_work, int_work, used)
    for start, perm in enumerate(starts):
        if _repeats_a_row(starts, start):  # it would climb the same hill (an easy problem's starts agree)
            continue
        score = _score(perm, tables)
        _derivatives(perm, tables, grad, fix)
        best[:] = perm
        best_score = score
        improved = True  # the best improved since the last local optimum
        failures = 0  # local optima in a row that did not improve the best
        for _ in range(max_iterations):
            if failures >= _PATIENCE:
                break
            gain, i, j = _best_swap(perm, grad, fix)
            moved = gain > tolerance
            if moved:
                _swap(perm, i, j, tables, grad, fix)
                score += gain  # the gain is the exact change
            else:  # IPFP's integer step: the assignment maximising the gradient, if it improves the score
                _assign(grad, jump, real_work, int_work, used)
                jump_score = _score(jump, tables)
                moved = jump_score - score > tolerance
                if moved:
                    perm[:] = jump
                    score = jump_score
                    _derivatives(perm, tables, grad, fix)
            if score > best_score:
                best[:] = perm
                best_score = score
                improved = True
            if not moved:  # a local optimum of both: go on from the best permutation, perturbed
                failures = 0 if improved else failures + 1
                improved = False
                if failures < _PATIENCE:
                    perm[:] = best
                    for _ in range(_KICK_SWAPS):
                        first = rng.integers(0, n)
                        second = (first + rng.integers(1, n)) % n
                        perm[first], perm[second] = perm[second], perm[first]
                    score = _score(perm, tables)
                    _derivatives(perm, tables, grad, fix)
        # rescored: the running score adds up swap gains and carries their rounding
        final = _score(best, tables)
        if final > result_score:
            result[:] = best
            result_score = final


@njit(cache=True)
def _enumerate(tables, result):  # pragma: no cover - compiled
    """Writes into result (n,) the first (in lexicographic order) optimal permutation of one problem, by a
    depth-first enumeration of all n! permutations that adds each node's unary and pair terms as it is
    assigned."""
    unary = tables.unary
    n = unary.shape[0]
    # pair[i, j, a, c], i < j: score of the edges between i and j when i -> a and j -> c
    pair = np.zeros((n, n, n, n))
    adjacent = np.zeros((n, n), np.bool_)
    for m in range(tables.src.size):
        s, d = tables.src[m], tables.dst[m]
        adjacent[min(s, d), max(s, d)] = True
        for a in range(n):
            for q in range(tables.out_start[a], tables.out_start[a + 1]):
                c, w = tables.out_tail[q], tables.out_weights[m, q]
                if s < d:
                    pair[s, d, a, c] += w
                else:
                    pair[d, s, c, a] += w
    choice = np.full(n, -1, np.int64)
    taken = np.zeros(n, np.bool_)
    partial = np.zeros(n + 1)
    best = -np.inf
    level = 0
    while level >= 0:
        if choice[level] >= 0:
            taken[choice[level]] = False
        target = choice[level] + 1
        while target < n and taken[target]:
            target += 1
        if target == n:  # every target tried at this level: back up
            choice[level] = -1
            level -= 1
            continue
        choice[level] = target
        taken[target] = True
        value = partial[level] + unary[level, target]
        for earlier in range(level):
            if adjacent[earlier, level]:
                value += pair[earlier, level, choice[earlier], target]
        if level == n - 1:
            if value > best:
                best = value
                result[:] = choice
        else:
            partial[level + 1] = value
            level += 1


@njit(cache=True)
def _solve_batch(unary, pairwise, edges1, edges2, exact, random_starts, max_iterations, rng):  # pragma: no cover
    """(B, n) permutations of B problems: exact enumeration or iterated local search."""
    batch, n = unary.shape[0], unary.shape[1]
    perms = np.zeros((batch, n), np.int64)
    if n == 1:
        return perms
    for b in range(batch):
        tables = _edge_tables(unary[b], pairwise[b], edges1[b], edges2[b])
        if exact:
            _enumerate(tables, perms[b])
        else:
            _local_search(tables, random_starts, max_iterations, rng, perms[b])
    return perms


# ---------------------------------------------------------------------------------------------------------
# Host side: one copy of a batch to the host, one copy of its permutations back.


def _host_copy(problem: QAPBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """unary (B, n, n), pairwise (B, E1, E2) float64 and edges1, edges2 int64 on the host, by one
    device-to-host copy of one flat float64 array (node indices are exact in it); node indices checked.
    Each part is a contiguous section of the copy: the float arrays are views of it, not further copies."""
    u, w, edges1, edges2 = problem.unary, problem.pairwise, problem.edges1, problem.edges2
    batch, n = u.shape[:2]
    e1, e2 = edges1.shape[1], edges2.shape[1]
    sizes = [batch * n * n, batch * e1 * e2, batch * 2 * e1, batch * 2 * e2]
    packed = u.new_empty(sum(sizes), dtype=torch.float64)
    torch.cat([u.flatten(), w.flatten(), edges1.flatten(), edges2.flatten()], out=packed)
    unary, pairwise, edges1, edges2 = np.split(packed.cpu().numpy(), np.cumsum(sizes)[:-1])
    edges1 = edges1.astype(np.int64).reshape(batch, e1, 2)
    edges2 = edges2.astype(np.int64).reshape(batch, e2, 2)
    _check_node_indices("edges1", edges1, n)
    _check_node_indices("edges2", edges2, n)
    return unary.reshape(batch, n, n), pairwise.reshape(batch, e1, e2), edges1, edges2


def _permutation_matrices(perms: np.ndarray, like: Tensor) -> Tensor:
    """(B, n) host permutations -> (B, n, n) permutation matrices in like's dtype and on its device."""
    n = perms.shape[1]
    host_dtype = np.float64 if like.dtype == torch.float64 else np.float32
    matrices = torch.from_numpy(np.eye(n, dtype=host_dtype)[perms])
    return matrices.to(device=like.device, dtype=like.dtype, non_blocking=True)


@torch.no_grad()
def linear_assignment(unary: Tensor) -> Tensor:
    """(B, n, n) -> (B, n, n) permutation matrices maximising sum(unary * X), in unary's dtype and device.

    One copy to the host and back for the whole batch. NaN counts as -1e300 and magnitudes beyond 1e300
    (infinities too) are clipped to it.
    """
    if not isinstance(unary, Tensor) or unary.dim() != 3 or unary.shape[1] != unary.shape[2]:
        raise ValueError(f"unary must be (B, n, n), got {_describe(unary)}")
    if not unary.is_floating_point():
        raise ValueError(f"unary must be floating point, got {_describe(unary)}")
    return _permutation_matrices(_assign_batch(unary.double().cpu().numpy()), unary)


def _distributed_rank() -> int:
    distributed = torch.distributed
    return distributed.get_rank() if distributed.is_available() and distributed.is_initialized() else 0


class GraphMatchingSolver:
    """Maximises score(X) over permutation matrices for each problem of a QAPBatch.

    Returns (B, n, n) permutation matrices in unary's dtype and device, without autograd graph. Any float
    dtype is accepted (float32, bfloat16, float16...): the search runs in float64 on the host.
    n <= exact_max_nodes (at most 9): exact, by enumeration. Otherwise iterated local search from
    2 + random_starts starts per problem (LAP of the unary, spectral, LAPs of the unary perturbed by Gumbel
    noise). Each step takes the best improving 2-swap or, when there is none, the IPFP jump to the LAP of the
    gradient if it improves. At a local optimum of both, the start goes on from its best permutation perturbed
    by 3 random swaps, until that fails to improve it 3 times in a row or it has taken max_iterations steps;
    the best start wins (a start equal to an earlier one is skipped). One call solves the whole batch: one copy
    to the host, compiled code there (numba), one copy back.

    seed seeds the solver's generator for the random starts and perturbations. None draws the seed from
    torch's default CPU generator when the solver is built (and mixes in the torch.distributed rank when
    initialised), so that ``torch.manual_seed`` or MONAI's ``set_determinism`` before building it makes its
    results reproducible.
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
        if seed is None:
            drawn = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
            self._generator = np.random.default_rng([drawn, _distributed_rank()])
        else:
            self._generator = np.random.default_rng(seed)

    @torch.no_grad()
    def __call__(self, problem: QAPBatch) -> Tensor:
        unary, pairwise, edges1, edges2 = _host_copy(problem)
        exact = unary.shape[1] <= self.exact_max_nodes
        perms = _solve_batch(
            unary, pairwise, edges1, edges2, exact, self.random_starts, self.max_iterations, self._generator
        )
        return _permutation_matrices(perms, problem.unary)

"""Gradients through a combinatorial graph-matching solver by Implicit MLE (IMLE).

The matching returned by a solver is piecewise constant in its affinities, so its true gradient is
zero almost everywhere. IMLE (Niepert, Minervini & Franceschi, NeurIPS 2021), as used by LVM-Med
(Nguyen et al., NeurIPS 2023, Eq. 6 and Algorithm 1) after the black-box matching of BB-GM
(Rolínek et al., ECCV 2020), estimates the gradient of a loss L with respect to the affinities theta
by a finite difference between two perturbed solutions:

    x  = MAP(theta + eps)
    x' = MAP(theta + eps - lambda * g / |g|)        (the target distribution)
    dL/dtheta ~ |g| * mean over samples of (x - x') / lambda

with g = dL/dx the incoming gradient and |g| its largest magnitude per problem. Normalising the step
by |g| gives lambda one meaning, whatever the loss's weight or AMP's loss scale: the target moves
every affinity by at most lambda (the affinities are cosines in [-1, 1]), and the gradient is linear
in g (the gradient of k * L is k times that of L). eps is Gumbel noise (of a fixed scale, or of a scale
relative to the spread of each problem's vertex affinities: ``noise_reference="spread"``), or, for the paper's "no Gumbel
noise" ablation, the constant margin of BB-GM: ``-margin`` on the true-match entries, so the solver
must beat the true matching by that margin. For the second-order part of theta (edge affinities) the
solution is the edge-match indicator Y[e, f] = x[i_e, a_f] * x[j_e, b_f], and the same difference is
taken on Y.

``imle_match`` serves any loss of the matching: the target is solved in the backward, once g is known.
``imle_linear_loss`` serves losses linear in the matching, <cost, x> (the Hamming distance is one, with cost
``1 - 2 * truth``): g's direction is the cost's, known in the forward, so the target problems are solved in
the same solver call as the perturbed ones and the backward only scales the stored difference (a second
solve only for problems whose incoming gradient is negative, i.e. a loss being maximised).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from scripts.objective.qap import QAPBatch, edge_pair_matches, edge_selection

__all__ = ["Solver", "imle_match", "imle_linear_loss", "IMLEState"]

Solver = Callable[[QAPBatch], torch.Tensor]
"""Maps a QAPBatch to (B, n, n) permutation matrices maximising its score."""

_EULER_GAMMA = 0.5772156649015329  # mean of the standard Gumbel distribution


class IMLEState:
    """What the last forward and backward of an IMLE call saw, for statistics; tensors, no host sync.

    Attributes:
        matching: (S*B, n, n) perturbed solutions x of the last forward.
        target_matching: (S*B, n, n) target solutions x' (None until known: in the forward for
            ``imle_linear_loss``, in the backward for ``imle_match``).
    """

    def __init__(self) -> None:
        self.matching: torch.Tensor | None = None
        self.target_matching: torch.Tensor | None = None


def imle_match(
    problem: QAPBatch,
    solver: Solver,
    lambda_: float,
    noise: Literal["gumbel", "none"] = "gumbel",
    noise_scale: float = 1.0,
    margin: float = 1.0,
    num_samples: int = 1,
    truth: torch.Tensor | None = None,
    state: IMLEState | None = None,
    noise_reference: Literal["absolute", "spread"] = "absolute",
) -> torch.Tensor:
    """Solves a batch of graph-matching problems with IMLE gradients for its affinities, for any loss.

    Args:
        problem: B problems whose ``unary`` (B, n, n) and ``pairwise`` (B, E1, E2) affinities may
            require gradients.
        solver: the MAP solver, e.g. ``GraphMatchingSolver()`` or ``linear_assignment`` on the unary.
        lambda_: finite-difference step (> 0): the largest move of an affinity towards the target, in
            the affinities' own units.
        noise: "gumbel" perturbs affinities with mean-zero Gumbel(0, noise_scale) noise; "none" replaces
            the noise by the constant margin of BB-GM (``-margin`` on the true-match entries of the unary).
        noise_scale: Gumbel scale, in the affinities' units (``noise_reference="absolute"``) or in units of the
            standard deviation of each problem's vertex affinities (``"spread"``).
        margin: the constant margin of ``noise="none"`` (>= 0).
        num_samples: perturbations averaged, in the forward solution and in the gradient.
        truth: (B, n, n) true matchings (for the margin); None is the identity (view i <-> view i).
        state: receives the solutions for statistics.
        noise_reference: "absolute", or "spread": the Gumbel scale of problem b is ``noise_scale`` times the
            standard deviation of its vertex affinities (no gradient through it), on its vertex and edge
            affinities alike. A fixed scale stops perturbing the matching once the true pairs stand out by a few
            times the scale, and the IMLE gradient is then exactly zero while the representation may still be
            poor; relative to the spread, the noise keeps pace with the affinities (a temperature in their units).

    Returns:
        (B, n, n) matchings averaged over the samples (permutation matrices when num_samples is 1);
        differentiable with respect to ``problem.unary`` and ``problem.pairwise``. The backward solves the
        target problems (a second solver call); a loss linear in the matching is cheaper with
        ``imle_linear_loss``.

    Example::

        matching = imle_match(problem, GraphMatchingSolver(), lambda_=0.1)
        loss = hamming_distance(matching).mean()
        loss.backward()  # fills unary.grad and pairwise.grad
    """
    settings = _Settings(problem, solver, lambda_, noise, noise_scale, margin, num_samples, truth, state,
                         noise_reference)
    return _IMLEMatch.apply(problem.unary, problem.pairwise, settings)


def imle_linear_loss(
    problem: QAPBatch,
    solver: Solver,
    cost: torch.Tensor,
    lambda_: float,
    noise: Literal["gumbel", "none"] = "gumbel",
    noise_scale: float = 1.0,
    margin: float = 1.0,
    num_samples: int = 1,
    truth: torch.Tensor | None = None,
    state: IMLEState | None = None,
    noise_reference: Literal["absolute", "spread"] = "absolute",
) -> torch.Tensor:
    """Loss <cost, x> of IMLE matchings x, with the target problems solved in the forward's solver call.

    The loss's gradient with respect to x is ``cost``: its direction is known before the backward, so one
    solver call solves the perturbed problems x = MAP(theta + eps) and the targets
    x' = MAP(theta + eps - lambda_ * cost / |cost|) together; the backward scales x - x' (and the edge
    matches' difference) by the incoming gradient. Arguments as ``imle_match``'s, and

    Args:
        cost: (n, n) shared by the problems, or (B, n, n): the loss's coefficients, e.g. the Hamming distance's
            ``1 - 2 * truth`` (its value is then the distance minus n).

    Returns:
        (B,) loss values <cost, mean over samples of x>; differentiable with respect to ``problem.unary`` and
        ``problem.pairwise``.

    Example::

        eye = torch.eye(n)
        hamming = imle_linear_loss(problem, GraphMatchingSolver(), 1 - 2 * eye, lambda_=3.0) + n
        hamming.mean().backward()  # one solver call in all
    """
    shape = tuple(problem.unary.shape)
    if cost.shape not in (shape, shape[1:]):
        raise ValueError(f"cost must have shape {shape[1:]} or {shape} like the unary, got {tuple(cost.shape)}.")
    settings = _Settings(problem, solver, lambda_, noise, noise_scale, margin, num_samples, truth, state,
                         noise_reference)
    return _IMLELinearLoss.apply(problem.unary, problem.pairwise, cost.expand(shape), settings)


class _Settings:
    """Checked non-tensor arguments of the autograd functions and their shared steps."""

    def __init__(
        self,
        problem: QAPBatch,
        solver: Solver,
        lambda_: float,
        noise: str,
        noise_scale: float,
        margin: float,
        num_samples: int,
        truth: torch.Tensor | None,
        state: IMLEState | None,
        noise_reference: str,
    ) -> None:
        if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) or lambda_ <= 0:
            raise ValueError(f"lambda_ must be a positive number, got {lambda_!r}.")
        if noise not in ("gumbel", "none"):
            raise ValueError(f"noise must be 'gumbel' or 'none', got {noise!r}.")
        if noise_scale <= 0:
            raise ValueError(f"noise_scale must be positive, got {noise_scale}.")
        if noise_reference not in ("absolute", "spread"):
            raise ValueError(f"noise_reference must be 'absolute' or 'spread', got {noise_reference!r}.")
        if margin < 0:
            raise ValueError(f"margin must be non-negative, got {margin}.")
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        unary = problem.unary
        if truth is not None and truth.shape != unary.shape:
            raise ValueError(f"truth must have the unary's shape {tuple(unary.shape)}, got {tuple(truth.shape)}.")
        self.edges1 = problem.edges1
        self.edges2 = problem.edges2
        num_nodes = unary.shape[1]
        if problem.edges1.shape == problem.edges2.shape:  # both graphs' in one batch: fewer operator calls
            both = edge_selection(torch.stack([problem.edges1, problem.edges2]), num_nodes, unary.dtype)
            self.selection1, self.selection2 = both.unbind(0)
        else:
            self.selection1 = edge_selection(problem.edges1, num_nodes, unary.dtype)
            self.selection2 = edge_selection(problem.edges2, num_nodes, unary.dtype)
        self.solver = solver
        self.lambda_ = float(lambda_)
        self.noise = noise
        self.noise_scale = noise_scale
        self.noise_reference = noise_reference
        self.margin = margin
        self.num_samples = num_samples
        self.truth = truth
        self.state = state if state is not None else IMLEState()

    def samples(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (S*B, ...): one copy per noise sample."""
        return tensor if self.num_samples == 1 else tensor.repeat(self.num_samples, *([1] * (tensor.ndim - 1)))

    def sample_mean(self, stacked: torch.Tensor) -> torch.Tensor:
        """(S*B, ...) -> (B, ...) mean over the samples."""
        if self.num_samples == 1:
            return stacked
        # the batch size spelt out: -1 cannot be inferred for empty tensors (the pairwise of a linear assignment)
        return stacked.reshape(self.num_samples, stacked.shape[0] // self.num_samples, *stacked.shape[1:]).mean(0)

    def perturbed(self, unary: torch.Tensor, pairwise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The S stacked perturbed copies of the affinities: (S*B, n, n) and (S*B, E1, E2)."""
        unary, pairwise = self.samples(unary), self.samples(pairwise)
        if self.noise == "none":
            if self.truth is None:
                lowered = unary.clone()
                lowered.diagonal(dim1=1, dim2=2).sub_(self.margin)
                return lowered, pairwise
            return unary - self.margin * self.samples(self.truth), pairwise
        if self.noise_reference == "absolute":
            return self._add_gumbel(unary), self._add_gumbel(pairwise)
        # (S*B, 1, 1) spread per problem (zero, thus no noise, where every affinity is equal)
        spread = torch.std(unary, dim=(1, 2), keepdim=True)
        return self._add_gumbel(unary, spread), self._add_gumbel(pairwise, spread)

    def _add_gumbel(self, values: torch.Tensor, spread: torch.Tensor | None = None) -> torch.Tensor:
        """values + mean-zero Gumbel(0, noise_scale [* spread]) noise, as -log of standard exponential draws from
        torch's generator (``torch.distributions.Gumbel`` validates its parameters with a device-to-host sync).
        Mean-zero: a positive mean on edge affinities would favour matchings that keep more edges. ``spread``: a
        tensor broadcast against ``values`` that multiplies the scale."""
        exponential = torch.empty_like(values).exponential_().clamp_min_(torch.finfo(values.dtype).tiny)
        gumbel = exponential.log_().add_(_EULER_GAMMA)
        if spread is None:
            return torch.add(values, gumbel, alpha=-self.noise_scale)
        return torch.addcmul(values, gumbel, spread, value=-self.noise_scale)

    def solve(self, unary: torch.Tensor, pairwise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solutions x (K, n, n) and their edge matches Y (K, E1, E2) of K = copies x B stacked problems."""
        copies = unary.shape[0] // self.edges1.shape[0]
        edges1, edges2 = self.edges1, self.edges2
        if copies > 1:
            edges1, edges2 = edges1.repeat(copies, 1, 1), edges2.repeat(copies, 1, 1)
        matching = self.solver(QAPBatch(unary=unary, edges1=edges1, edges2=edges2, pairwise=pairwise))
        return matching, edge_pair_matches(self.selection1, self.selection2, matching)


def _unit_direction(gradient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n, n) gradient -> (its direction with largest magnitude 1 per problem, (B, 1, 1) that magnitude)."""
    magnitude = gradient.abs().amax((1, 2), keepdim=True)
    return gradient / magnitude.clamp_min(torch.finfo(gradient.dtype).tiny), magnitude


class _IMLEMatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, unary: torch.Tensor, pairwise: torch.Tensor, settings: _Settings) -> torch.Tensor:
        noisy_unary, noisy_pairwise = settings.perturbed(unary, pairwise)  # no autograd inside forward
        matching, matched_edges = settings.solve(noisy_unary, noisy_pairwise)
        settings.state.matching, settings.state.target_matching = matching, None
        ctx.settings = settings
        ctx.save_for_backward(noisy_unary, noisy_pairwise, matching, matched_edges)
        return settings.sample_mean(matching)

    @staticmethod
    def backward(ctx: Any, grad_matching: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        settings: _Settings = ctx.settings
        noisy_unary, noisy_pairwise, matching, matched_edges = ctx.saved_tensors
        direction, magnitude = _unit_direction(grad_matching)
        target = noisy_unary - settings.lambda_ * settings.samples(direction)
        target_matching, target_edges = settings.solve(target, noisy_pairwise)
        settings.state.target_matching = target_matching
        # problems without incoming gradient get none back, whatever their target
        scale = magnitude / settings.lambda_
        grad_unary = settings.sample_mean(matching - target_matching) * scale
        grad_pairwise = settings.sample_mean(matched_edges - target_edges) * scale
        return grad_unary, grad_pairwise, None


class _IMLELinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, unary: torch.Tensor, pairwise: torch.Tensor, cost: torch.Tensor, settings: _Settings
    ) -> torch.Tensor:
        noisy_unary, noisy_pairwise = settings.perturbed(unary, pairwise)  # no autograd inside forward
        direction, magnitude = _unit_direction(cost)
        step = settings.lambda_ * settings.samples(direction)
        # one solver call for the perturbed and the target problems
        solutions, edges = settings.solve(torch.cat([noisy_unary, noisy_unary - step]), noisy_pairwise.repeat(2, 1, 1))
        matching, target_matching = solutions.chunk(2)
        matched_edges, target_edges = edges.chunk(2)
        settings.state.matching, settings.state.target_matching = matching, target_matching
        ctx.settings = settings
        ctx.save_for_backward(
            settings.sample_mean(matching - target_matching), settings.sample_mean(matched_edges - target_edges),
            magnitude / settings.lambda_, noisy_unary, noisy_pairwise, matching, matched_edges, step,
        )
        return (settings.sample_mean(matching) * cost).sum((1, 2))

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        settings: _Settings = ctx.settings
        unary_difference, edge_difference, step_scale, noisy_unary, noisy_pairwise, matching, matched_edges, step = (
            ctx.saved_tensors
        )
        # x - x' for the gradient g = grad * cost; |g| / lambda = grad * |cost| / lambda
        scale = grad_loss.view(-1, 1, 1) * step_scale
        if bool((grad_loss < 0).any()):
            # a maximised loss: its target lies the other way, solved now; |g| (x - x'') = scale (x'' - x)
            reverse_matching, reverse_edges = settings.solve(noisy_unary + step, noisy_pairwise)
            negative = grad_loss.view(-1, 1, 1) < 0
            unary_difference = torch.where(negative, settings.sample_mean(reverse_matching - matching), unary_difference)
            edge_difference = torch.where(negative, settings.sample_mean(reverse_edges - matched_edges), edge_difference)
        return unary_difference * scale, edge_difference * scale, None, None

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
in g (the gradient of k * L is k times that of L). eps is Gumbel noise, or, for the paper's "no Gumbel
noise" ablation, the constant margin of BB-GM: ``-margin`` on the true-match entries, so the solver
must beat the true matching by that margin. For the second-order part of theta (edge affinities) the
solution is the edge-match indicator Y[e, f] = x[i_e, a_f] * x[j_e, b_f], and the same difference is
taken on Y.

When the loss's gradient direction is known in the forward (the Hamming loss: ``1 - 2 * truth``), the
target problems are solved in the same solver call as the perturbed ones, and the backward only scales
the stored difference; it falls back to a second solve when the incoming gradient is not along that
direction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from scripts.objective.qap import QAPBatch, edge_matches

__all__ = ["Solver", "imle_match", "IMLEState"]

Solver = Callable[[QAPBatch], torch.Tensor]
"""Maps a QAPBatch to (B, n, n) permutation matrices maximising its score."""

# an incoming gradient counts as along the known direction when it differs by less than this share of its size
_DIRECTION_TOLERANCE = 1e-5
_EULER_GAMMA = 0.5772156649015329  # mean of the standard Gumbel distribution


class IMLEState:
    """What the last forward and backward of ``imle_match`` saw, for statistics; tensors, no host sync.

    Attributes:
        matching: (S*B, n, n) perturbed solutions x of the last forward.
        target_matching: (S*B, n, n) target solutions x' (None until known: forward when fused, else backward).
        fused: whether the backward used the target solved in the forward.
    """

    def __init__(self) -> None:
        self.matching: torch.Tensor | None = None
        self.target_matching: torch.Tensor | None = None
        self.fused = False


def imle_match(
    problem: QAPBatch,
    solver: Solver,
    lambda_: float,
    noise: Literal["gumbel", "none"] = "gumbel",
    noise_scale: float = 1.0,
    margin: float = 1.0,
    num_samples: int = 1,
    truth: torch.Tensor | None = None,
    loss_direction: torch.Tensor | None = None,
    state: IMLEState | None = None,
) -> torch.Tensor:
    """Solves a batch of graph-matching problems with IMLE gradients for its affinities.

    Args:
        problem: B problems whose ``unary`` (B, n, n) and ``pairwise`` (B, E1, E2) affinities may
            require gradients.
        solver: the MAP solver, e.g. ``GraphMatchingSolver()`` or ``linear_assignment`` on the unary.
        lambda_: finite-difference step (> 0): the largest move of an affinity towards the target, in
            the affinities' own units.
        noise: "gumbel" perturbs affinities with mean-zero Gumbel(0, noise_scale) noise; "none" replaces
            the noise by the constant margin of BB-GM (``-margin`` on the true-match entries of the unary).
        noise_scale: Gumbel scale.
        margin: the constant margin of ``noise="none"`` (>= 0).
        num_samples: perturbations averaged, in the forward solution and in the gradient.
        truth: (B, n, n) true matchings (for the margin); None is the identity (view i <-> view i).
        loss_direction: (B, n, n) gradient of the downstream loss with respect to the matching, up to a
            positive factor per problem (the Hamming loss's ``1 - 2 * truth``); when given, the target
            problems are solved in the forward, in the same solver call.
        state: receives the solutions for statistics.

    Returns:
        (B, n, n) matchings averaged over the samples (permutation matrices when num_samples is 1);
        differentiable with respect to ``problem.unary`` and ``problem.pairwise``.

    Example::

        matching = imle_match(problem, GraphMatchingSolver(), lambda_=0.1, loss_direction=1 - 2 * eye)
        loss = hamming_distance(matching).mean()
        loss.backward()  # fills unary.grad and pairwise.grad
    """
    if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) or lambda_ <= 0:
        raise ValueError(f"lambda_ must be a positive number, got {lambda_!r}.")
    if noise not in ("gumbel", "none"):
        raise ValueError(f"noise must be 'gumbel' or 'none', got {noise!r}.")
    if noise_scale <= 0:
        raise ValueError(f"noise_scale must be positive, got {noise_scale}.")
    if margin < 0:
        raise ValueError(f"margin must be non-negative, got {margin}.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
    shape = tuple(problem.unary.shape)
    for name, value in (("truth", truth), ("loss_direction", loss_direction)):
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{name} must have the unary's shape {shape}, got {tuple(value.shape)}.")
    if truth is None:
        truth = torch.eye(shape[1], dtype=problem.unary.dtype, device=problem.unary.device).expand(shape)
    settings = _Settings(problem, solver, float(lambda_), noise, noise_scale, margin, num_samples, truth,
                         loss_direction, state if state is not None else IMLEState())
    return _IMLEMatch.apply(problem.unary, problem.pairwise, settings)


class _Settings:
    """Non-tensor arguments of the autograd function, carried as one object."""

    def __init__(
        self,
        problem: QAPBatch,
        solver: Solver,
        lambda_: float,
        noise: str,
        noise_scale: float,
        margin: float,
        num_samples: int,
        truth: torch.Tensor,
        loss_direction: torch.Tensor | None,
        state: IMLEState,
    ) -> None:
        self.edges1 = problem.edges1
        self.edges2 = problem.edges2
        self.solver = solver
        self.lambda_ = lambda_
        self.noise = noise
        self.noise_scale = noise_scale
        self.margin = margin
        self.num_samples = num_samples
        self.truth = truth
        # the known direction of the loss's gradient, largest magnitude 1 per problem
        self.direction = None if loss_direction is None else _unit_direction(loss_direction)[0]
        self.state = state

    def perturbed(self, unary: torch.Tensor, pairwise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The S stacked perturbed copies of the affinities: (S*B, n, n) and (S*B, E1, E2)."""
        unary = unary.repeat(self.num_samples, 1, 1)
        pairwise = pairwise.repeat(self.num_samples, 1, 1)
        if self.noise == "none":
            return unary - self.margin * self.truth.repeat(self.num_samples, 1, 1), pairwise
        return unary + self._gumbel(unary), pairwise + self._gumbel(pairwise)

    def _gumbel(self, like: torch.Tensor) -> torch.Tensor:
        """Mean-zero Gumbel(0, noise_scale) noise of ``like``'s shape, by inverse transform sampling from torch's
        generator (``torch.distributions.Gumbel`` validates its parameters with a device-to-host sync). Mean-zero:
        a positive mean on edge affinities would favour matchings that keep more edges."""
        uniform = torch.rand_like(like).clamp_(torch.finfo(like.dtype).tiny, 1.0 - torch.finfo(like.dtype).eps)
        return uniform.log_().neg_().log_().neg_().sub_(_EULER_GAMMA).mul_(self.noise_scale)

    def target(self, noisy_unary: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """(S*B, n, n) target unary: moved by lambda against a (B, n, n) direction of largest magnitude 1."""
        return noisy_unary - self.lambda_ * direction.repeat(self.num_samples, 1, 1)

    def solve(self, unary: torch.Tensor, pairwise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solutions x (K, n, n) and their edge matches Y (K, E1, E2) of K = copies * B stacked problems."""
        copies = unary.shape[0] // self.edges1.shape[0]
        problem = QAPBatch(
            unary=unary,
            edges1=self.edges1.repeat(copies, 1, 1),
            edges2=self.edges2.repeat(copies, 1, 1),
            pairwise=pairwise,
        )
        matching = self.solver(problem)
        return matching, edge_matches(problem, matching)

    def sample_mean(self, stacked: torch.Tensor) -> torch.Tensor:
        """(S*B, ...) -> (B, ...) mean over the samples."""
        return stacked.reshape(self.num_samples, self.edges1.shape[0], *stacked.shape[1:]).mean(0)


def _unit_direction(gradient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n, n) gradient -> (its direction with largest magnitude 1 per problem, (B,) that magnitude)."""
    magnitude = gradient.abs().amax((1, 2))
    return gradient / magnitude.clamp_min(torch.finfo(gradient.dtype).tiny)[:, None, None], magnitude


class _IMLEMatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, unary: torch.Tensor, pairwise: torch.Tensor, settings: _Settings) -> torch.Tensor:
        noisy_unary, noisy_pairwise = settings.perturbed(unary.detach(), pairwise.detach())
        size = noisy_unary.shape[0]
        if settings.direction is not None:
            # one solver call for the perturbed and the target problems
            target_unary = settings.target(noisy_unary, settings.direction)
            solutions, edges = settings.solve(torch.cat([noisy_unary, target_unary]), noisy_pairwise.repeat(2, 1, 1))
            matching, target_matching = solutions[:size], solutions[size:]
            matched_edges, target_edges = edges[:size], edges[size:]
            settings.state.target_matching = target_matching
        else:
            matching, matched_edges = settings.solve(noisy_unary, noisy_pairwise)
            target_matching = target_edges = torch.empty(0)
            settings.state.target_matching = None
        settings.state.matching = matching
        ctx.settings = settings
        ctx.save_for_backward(noisy_unary, noisy_pairwise, matching, matched_edges, target_matching, target_edges)
        return settings.sample_mean(matching)

    @staticmethod
    def backward(ctx: Any, grad_matching: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        settings: _Settings = ctx.settings
        noisy_unary, noisy_pairwise, matching, matched_edges, target_matching, target_edges = ctx.saved_tensors
        direction, magnitude = _unit_direction(grad_matching)
        # problems without incoming gradient get none back, whatever their target
        fused = settings.direction is not None and bool(
            (((direction - settings.direction).abs().amax((1, 2)) <= _DIRECTION_TOLERANCE) | (magnitude == 0)).all()
        )
        if not fused:
            # the loss does not depend on the edge matches directly: only the unary target moves
            target_matching, target_edges = settings.solve(settings.target(noisy_unary, direction), noisy_pairwise)
            settings.state.target_matching = target_matching
        settings.state.fused = fused
        scale = (magnitude / settings.lambda_)[:, None, None]
        grad_unary = settings.sample_mean(matching - target_matching) * scale
        grad_pairwise = settings.sample_mean(matched_edges - target_edges) * scale
        return grad_unary, grad_pairwise, None

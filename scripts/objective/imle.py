"""Gradients through a combinatorial graph-matching solver by Implicit MLE (IMLE).

The matching returned by a solver is piecewise constant in its affinities, so its true gradient is
zero almost everywhere. IMLE (Niepert, Minervini & Franceschi, NeurIPS 2021), as used by LVM-Med
(Nguyen et al., NeurIPS 2023, Eq. 6 and Algorithm 1), estimates the gradient of a loss L with
respect to the affinities theta by a finite difference between two perturbed solutions:

    x  = MAP(theta + eps)
    x' = MAP(theta + eps - step * dL/dx)          (the target distribution)
    dL/dtheta ~ mean over samples of (x - x') / step

with eps drawn from a Gumbel distribution (or zero: the paper's "no Gumbel noise" ablation). For
the second-order part of theta (edge affinities) the solution is the edge-match indicator
Y[e, f] = x[i_e, a_f] * x[j_e, b_f], so the same difference is taken on Y.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.distributions import Gumbel

from scripts.objective.qap import QAPBatch, edge_matches

__all__ = ["Solver", "imle_match"]

Solver = Callable[[QAPBatch], torch.Tensor]
"""Maps a QAPBatch to (B, n, n) permutation matrices maximising its score."""


def imle_match(
    problem: QAPBatch,
    solver: Solver,
    step: float,
    noise: Literal["gumbel", "none"] = "gumbel",
    noise_scale: float = 1.0,
    num_samples: int = 1,
) -> torch.Tensor:
    """Solves a batch of graph-matching problems with IMLE gradients for its affinities.

    Args:
        problem: B problems whose ``unary`` (B, n, n) and ``pairwise`` (B, E1, E2) affinities may
            require gradients.
        solver: the MAP solver, e.g. ``GraphMatchingSolver()`` or ``linear_assignment`` on the unary.
        step: finite-difference step lambda applied to the incoming gradient (> 0).
        noise: "gumbel" perturbs affinities with mean-zero Gumbel(0, noise_scale) noise; "none" solves
            the unperturbed problem (a constant shift, which leaves the solution unchanged).
        noise_scale: Gumbel scale.
        num_samples: perturbations averaged, in the forward solution and in the gradient.

    Returns:
        (B, n, n) matchings averaged over the samples (permutation matrices when num_samples is 1);
        differentiable with respect to ``problem.unary`` and ``problem.pairwise``.

    Example::

        matching = imle_match(problem, GraphMatchingSolver(), step=80.0)
        loss = hamming_loss(matching)
        loss.backward()  # fills unary.grad and pairwise.grad
    """
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}.")
    if noise not in ("gumbel", "none"):
        raise ValueError(f"noise must be 'gumbel' or 'none', got {noise!r}.")
    if noise_scale <= 0:
        raise ValueError(f"noise_scale must be positive, got {noise_scale}.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
    settings = _Settings(problem, solver, step, noise, noise_scale, num_samples)
    return _IMLEMatch.apply(problem.unary, problem.pairwise, settings)


class _Settings:
    """Non-tensor arguments of the autograd function, carried as one object."""

    def __init__(
        self, problem: QAPBatch, solver: Solver, step: float, noise: str, noise_scale: float, num_samples: int
    ) -> None:
        self.edges1 = problem.edges1
        self.edges2 = problem.edges2
        self.solver = solver
        self.step = step
        self.noise = noise
        self.noise_scale = noise_scale
        self.num_samples = num_samples

    def perturbed(self, unary: torch.Tensor, pairwise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The S stacked noisy copies of the affinities: (S*B, n, n) and (S*B, E1, E2)."""
        unary = unary.repeat(self.num_samples, 1, 1)
        pairwise = pairwise.repeat(self.num_samples, 1, 1)
        if self.noise == "none":
            return unary, pairwise
        scale = torch.tensor(self.noise_scale, dtype=unary.dtype, device=unary.device)
        gumbel = Gumbel(torch.zeros_like(scale), scale)
        # mean-zero noise: a positive mean on edge affinities would favour matchings that keep more edges
        mean = gumbel.mean
        return unary + gumbel.sample(unary.shape) - mean, pairwise + gumbel.sample(pairwise.shape) - mean

    def solve(self, unary: torch.Tensor, pairwise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solutions x (S*B, n, n) and their edge matches Y (S*B, E1, E2)."""
        problem = QAPBatch(
            unary=unary,
            edges1=self.edges1.repeat(self.num_samples, 1, 1),
            edges2=self.edges2.repeat(self.num_samples, 1, 1),
            pairwise=pairwise,
        )
        matching = self.solver(problem)
        return matching, edge_matches(problem, matching)

    def sample_mean(self, stacked: torch.Tensor) -> torch.Tensor:
        """(S*B, ...) -> (B, ...) mean over the samples."""
        return stacked.reshape(self.num_samples, self.edges1.shape[0], *stacked.shape[1:]).mean(0)


class _IMLEMatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, unary: torch.Tensor, pairwise: torch.Tensor, settings: _Settings) -> torch.Tensor:
        noisy_unary, noisy_pairwise = settings.perturbed(unary.detach(), pairwise.detach())
        matching, matched_edges = settings.solve(noisy_unary, noisy_pairwise)
        ctx.settings = settings
        ctx.save_for_backward(noisy_unary, noisy_pairwise, matching, matched_edges)
        return settings.sample_mean(matching)

    @staticmethod
    def backward(ctx: Any, grad_matching: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        settings: _Settings = ctx.settings
        noisy_unary, noisy_pairwise, matching, matched_edges = ctx.saved_tensors
        # the loss does not depend on the edge matches directly: only the unary target moves
        target_unary = noisy_unary - settings.step * grad_matching.repeat(settings.num_samples, 1, 1)
        target_matching, target_edges = settings.solve(target_unary, noisy_pairwise)
        grad_unary = settings.sample_mean(matching - target_matching) / settings.step
        grad_pairwise = settings.sample_mean(matched_edges - target_edges) / settings.step
        return grad_unary, grad_pairwise, None

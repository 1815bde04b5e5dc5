"""Standard self-supervised objectives as drop-in replacements of ``LVMMedLoss`` in ``configs/pretrain.json``.

Each takes ``LVMMedLoss``'s call, ``(embeddings1, embeddings2, features1, features2, grid1, grid2)``, so that the
same ``PretrainModel``, two-view transform, handlers and encoder export train it; the feature maps and grids
are accepted and ignored (these objectives compare the projector embeddings only). Select one with a single
override of the pretraining config (the definitions are its ``baseline_objectives`` block)::

    python -m monai.bundle run --config_file configs/pretrain.json --loss "@baseline_objectives#simclr"

(``#vicreg``, ``#barlow_twins`` likewise). SimCLR uses MONAI's ``ContrastiveLoss``, which is NT-Xent exactly.
VICReg and Barlow Twins are written here: MONAI has neither, and the library that has both (lightly) depends on
torchvision, which this bundle does not install.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss
from torch import nn

__all__ = ["BarlowTwinsLoss", "SimCLRLoss", "VICRegLoss"]


def _check_pair(embeddings1: torch.Tensor, embeddings2: torch.Tensor, minimum_batch: int) -> None:
    """Two (N, F) embeddings of equal shape with N >= minimum_batch; ValueError naming the problem otherwise."""
    for name, value in (("embeddings1", embeddings1), ("embeddings2", embeddings2)):
        if value.ndim != 2:
            raise ValueError(f"{name} must have shape (N, F), got {tuple(value.shape)}.")
    if embeddings1.shape != embeddings2.shape:
        raise ValueError(f"embeddings1 and embeddings2 differ: {tuple(embeddings1.shape)} vs {tuple(embeddings2.shape)}.")
    if embeddings1.shape[0] < minimum_batch:
        raise ValueError(f"this objective needs a batch of at least {minimum_batch} images, got {embeddings1.shape[0]}.")


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


class _EmbeddingPairLoss(nn.Module):
    """Shared call of the baselines: ``LVMMedLoss``'s arguments, the embeddings checked, the loss computed by
    ``pair_loss`` in float32 with autocast off."""

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
            embeddings1, embeddings2: (N, F) embeddings of the two views, image i at row i; N >= 2.
            features1, features2, grid1, grid2: ignored (``LVMMedLoss``'s call).

        Returns:
            the scalar loss, computed in float32 (also under autocast).
        """
        _check_pair(embeddings1, embeddings2, 2)
        with torch.autocast(device_type=embeddings1.device.type, enabled=False):
            return self.pair_loss(embeddings1.float(), embeddings2.float())

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """The scalar loss of (N, F) float32 embeddings of the two views."""
        raise NotImplementedError


class SimCLRLoss(_EmbeddingPairLoss):
    """NT-Xent of SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
    ICML 2020): each view must pick its partner among the other 2N - 1 views by cosine similarity / temperature.

    MONAI's ``ContrastiveLoss`` computes exactly this (cosine similarities of the 2N views, the partner's term in
    the numerator, all 2N - 1 others in the denominator, mean over the 2N views). The default temperature 0.5 is
    the one SimCLR found best for its small-batch CIFAR-10 runs (appendix B.9) and MONAI's default; 0.1 suits
    batches of thousands.

    Args:
        temperature: softmax temperature, positive.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        self.temperature = _positive("temperature", temperature)
        self.contrastive = ContrastiveLoss(temperature=self.temperature)

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return self.contrastive(z1, z2)


class VICRegLoss(_EmbeddingPairLoss):
    """VICReg (Bardes, Ponce and LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
    Self-Supervised Learning", ICLR 2022, Eq. 1-6): ``sim_coeff`` x mean squared distance of the two views,
    ``std_coeff`` x hinge on each dimension's standard deviation (target 1, per view), ``cov_coeff`` x sum of
    squared off-diagonal covariances / F (per view). Defaults are the paper's: 25, 25, 1, eps 1e-4.

    Args:
        sim_coeff: weight of the invariance term.
        std_coeff: weight of the variance term.
        cov_coeff: weight of the covariance term.
        eps: added to the variance under the square root.
    """

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0, eps: float = 1e-4) -> None:
        super().__init__()
        self.sim_coeff = _positive("sim_coeff", sim_coeff)
        self.std_coeff = _positive("std_coeff", std_coeff)
        self.cov_coeff = _positive("cov_coeff", cov_coeff)
        self.eps = _positive("eps", eps)

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        invariance = F.mse_loss(z1, z2)
        variance = covariance = z1.new_zeros(())
        for z in (z1, z2):
            centred = z - z.mean(0)
            std = torch.sqrt(centred.var(0) + self.eps)
            variance = variance + F.relu(1.0 - std).mean() / 2
            cov = centred.T @ centred / (z.shape[0] - 1)
            off_diagonal = cov - torch.diag(torch.diagonal(cov))
            covariance = covariance + off_diagonal.pow(2).sum() / z.shape[1]
        return self.sim_coeff * invariance + self.std_coeff * variance + self.cov_coeff * covariance


class BarlowTwinsLoss(_EmbeddingPairLoss):
    """Barlow Twins (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021,
    Eq. 1): the cross-correlation matrix of the two views' batch-normalised embeddings is pushed to the identity,
    sum of (1 - C_ii)^2 plus ``lambda_offdiag`` x sum of C_ij^2 (i != j). The default 5e-3 is the paper's; the
    normalisation is a ``BatchNorm1d`` without affine parameters, as in the paper's pseudo-code.

    Args:
        embedding_dim: size F of the embeddings.
        lambda_offdiag: weight of the redundancy-reduction (off-diagonal) term.
    """

    def __init__(self, embedding_dim: int = 128, lambda_offdiag: float = 5e-3) -> None:
        super().__init__()
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim!r}.")
        self.embedding_dim = embedding_dim
        self.lambda_offdiag = _positive("lambda_offdiag", lambda_offdiag)
        self.normalise = nn.BatchNorm1d(embedding_dim, affine=False)

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if z1.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must have {self.embedding_dim} features, got {z1.shape[1]}.")
        z1, z2 = self.normalise(z1), self.normalise(z2)
        correlation = z1.T @ z2 / z1.shape[0]
        on_diagonal = (torch.diagonal(correlation) - 1).pow(2).sum()
        off_diagonal = (correlation - torch.diag(torch.diagonal(correlation))).pow(2).sum()
        return on_diagonal + self.lambda_offdiag * off_diagonal

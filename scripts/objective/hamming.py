"""Hamming distance of a matching to the true one, the loss of LVM-Med (Eq. 5)."""

from __future__ import annotations

import torch

__all__ = ["hamming_distance"]


def hamming_distance(matching: torch.Tensor) -> torch.Tensor:
    """Hamming distance between matchings and the identity matching (view i <-> view i).

    The distance is linear in the matching, sum(x * (1 - 2 I)) + n, so it also applies to matchings
    averaged over IMLE samples, and its gradient with respect to x is ``1 - 2 I``.

    Args:
        matching: (B, n, n) permutation matrices, or averages of them.

    Returns:
        (B,) number of entries that differ from the identity matrix (twice the wrongly matched vertices).
    """
    if matching.ndim != 3 or matching.shape[1] != matching.shape[2]:
        raise ValueError(f"matching must have shape (B, n, n), got {tuple(matching.shape)}.")
    num_nodes = matching.shape[1]
    identity = torch.eye(num_nodes, dtype=matching.dtype, device=matching.device)
    return (matching * (1 - 2 * identity)).sum(dim=(1, 2)) + num_nodes

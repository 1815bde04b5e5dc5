"""Where each feature-map cell of an augmented view lies in its original image.

LVM-Med's location-based local affinity (Nguyen et al., NeurIPS 2023, Eq. 2) compares a cell of
one view's feature map with the spatially closest cell of the other view, "closest" being measured
in the original image through the crop and flip that produced each view. Following lightly's
VICRegL loss, the geometry travels as a *grid*: for every cell, its centre in normalised
coordinates (y, x) of the original image, both in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop_grid", "pool_grid", "grid_box", "inside_box", "nearest_location"]


def crop_grid(boxes: torch.Tensor, flipped: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centres of a (R, S) feature map's cells in original-image coordinates.

    Args:
        boxes: crop boxes of shape (N, 4) as (y0, x0, y1, x1), normalised to [0, 1] in the original image.
        flipped: (N,) bool, whether the view was flipped horizontally after cropping.
        size: feature-map size (R, S).

    Returns:
        grid of shape (N, R, S, 2) holding (y, x) of each cell centre in the original image.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}.")
    if flipped.shape != boxes.shape[:1]:
        raise ValueError(f"flipped must have shape ({boxes.shape[0]},), got {tuple(flipped.shape)}.")
    rows, cols = size
    if rows < 1 or cols < 1:
        raise ValueError(f"size must be positive, got {size}.")
    # cell centres as fractions of the view
    v = (torch.arange(rows, device=boxes.device, dtype=boxes.dtype) + 0.5) / rows
    u = (torch.arange(cols, device=boxes.device, dtype=boxes.dtype) + 0.5) / cols
    u = torch.where(flipped[:, None], 1.0 - u[None, :], u[None, :])  # (N, S)
    y = boxes[:, 0:1] + v[None, :] * (boxes[:, 2:3] - boxes[:, 0:1])  # (N, R)
    x = boxes[:, 1:2] + u * (boxes[:, 3:4] - boxes[:, 1:2])  # (N, S)
    return torch.stack(torch.broadcast_tensors(y[:, :, None], x[:, None, :]), dim=-1)


def pool_grid(grid: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pools a grid to at most ``size`` x ``size`` cells, as the feature map it describes.

    Args:
        grid: (N, R, S, 2) cell centres.
        size: largest number of cells per side after pooling.

    Returns:
        (N, min(R, size), min(S, size), 2) centres of the pooled cells.
    """
    target = (min(grid.shape[1], size), min(grid.shape[2], size))
    return F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), target).permute(0, 2, 3, 1)


def grid_box(grid: torch.Tensor) -> torch.Tensor:
    """The region of the original image that a feature map's cells cover, from its grid of cell centres.

    Args:
        grid: (N, R, S, 2) cell centres (y, x), evenly spaced as ``crop_grid`` and ``pool_grid`` make them.

    Returns:
        (N, 4) boxes (y0, x0, y1, x1): the outermost centres widened by half a cell (a map of one row or
        column has no spacing to measure, and its box is the line through its centres).
    """
    if grid.ndim != 4 or grid.shape[-1] != 2:
        raise ValueError(f"grid must have shape (N, R, S, 2), got {tuple(grid.shape)}.")
    low, high = torch.aminmax(grid.flatten(1, 2), dim=1)  # (N, 2) each
    # half a cell per axis, from the spread of the centres over (cells - 1) gaps
    half = [0.5 / (cells - 1) if cells > 1 else 0.0 for cells in grid.shape[1:3]]
    widen = (high - low) * (half[0] if half[0] == half[1] else grid.new_tensor(half))
    return torch.cat([low - widen, high + widen], dim=1)


def inside_box(grid1: torch.Tensor, box2: torch.Tensor) -> torch.Tensor:
    """For every pair of views (i, a) of G graphs, which cells of view i lie inside view a's box.

    Args:
        grid1: (G, n, P, 2) cell centres of the first views.
        box2: (G, n, 4) boxes (y0, x0, y1, x1) of the second views.

    Returns:
        bool tensor (G, n, n, P).
    """
    low, high = box2.unsqueeze(1).unsqueeze(-2).split(2, dim=-1)  # (G, 1, n, 1, 2) each
    point = grid1.unsqueeze(2)  # (G, n, 1, P, 2)
    return ((point >= low) & (point <= high)).all(-1)


def nearest_location(grid1: torch.Tensor, grid2: torch.Tensor) -> torch.Tensor:
    """For every pair of views (i, a) and every cell p of view i, the cell of view a closest to it.

    Args:
        grid1: (..., N, P, 2) cell centres of N first views (P = R x S cells, flattened).
        grid2: (..., M, Q, 2) cell centres of M second views; leading dimensions as grid1's.

    Returns:
        long tensor of shape (..., N, M, P): index into the Q cells of view a.
    """
    return torch.cdist(grid1.unsqueeze(-3), grid2.unsqueeze(-4)).argmin(dim=-1)

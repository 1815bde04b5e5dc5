"""Per-modality intensity normalisation to [0, 1] and the channel-first layout of 2D images.

:func:`normalise_intensity` picks one rule per image (a 3D volume is normalised as a whole, so that its
slices share one scale):

1. a fixed window ``[low, high]`` when the manifest entry has one (CT always does, [-1000, 1000] HU by
   default): values are clipped to the window and mapped linearly onto [0, 1];
2. photographs (colour, endoscopy, dermoscopy, fundus) and any image stored with 8 bits: scaled by the range of
   the stored integer type (e.g. / 255), or min-max when it was stored as floats;
3. everything else (MRI, PET, ultrasound, X-ray, OCT, other): clipped to its (0.5, 99.5) percentiles, then
   min-max; when those percentiles coincide (a mostly constant image), plain min-max.

A constant image maps to zeros, never to NaN.
"""

from __future__ import annotations

import numpy as np

from scripts.data.manifest import DEFAULT_CT_WINDOW

__all__ = [
    "PERCENTILES",
    "PHOTOGRAPHIC_MODALITIES",
    "dtype_range_intensity",
    "min_max_intensity",
    "normalise_intensity",
    "percentile_intensity",
    "to_channel_first",
    "window_intensity",
]

PHOTOGRAPHIC_MODALITIES = frozenset({"colour", "endoscopy", "dermoscopy", "fundus"})
PERCENTILES = (0.5, 99.5)


def _scaled(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """``array`` clipped to [low, high] and mapped onto [0, 1] as float32; zeros when high <= low."""
    if not high > low:
        return np.zeros(array.shape, dtype=np.float32)
    return np.clip((np.asarray(array, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


def window_intensity(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to ``window = (low, high)`` and map onto [0, 1] (CT windowing)."""
    return _scaled(array, float(window[0]), float(window[1]))


def min_max_intensity(array: np.ndarray) -> np.ndarray:
    """Map [min, max] of the array onto [0, 1]."""
    return _scaled(array, float(array.min()), float(array.max()))


def percentile_intensity(array: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """Clip to the given percentiles and map them onto [0, 1]; min-max when they coincide."""
    low, high = np.percentile(array, percentiles)
    return _scaled(array, float(low), float(high)) if high > low else min_max_intensity(array)


def dtype_range_intensity(array: np.ndarray, dtype: str | np.dtype) -> np.ndarray:
    """Map the full range of the integer type ``dtype`` the values were stored in onto [0, 1]; min-max for floats."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "ui":
        return min_max_intensity(array)
    info = np.iinfo(dtype)
    return _scaled(array, float(info.min), float(info.max))


def normalise_intensity(
    array: np.ndarray,
    modality: str,
    window: tuple[float, float] | None = None,
    dtype: str | np.dtype | None = None,
) -> np.ndarray:
    """``array`` (any shape) as float32 in [0, 1] by the rule of its modality (see the module docstring).

    Args:
        array: image or volume values (finite).
        modality: canonical modality name (``scripts.data.manifest.MODALITIES``).
        window: fixed window; default [-1000, 1000] for CT, none otherwise.
        dtype: the type the values were stored in (``ImageHeader.dtype``); default ``array.dtype``.
    """
    if window is None and modality == "CT":
        window = DEFAULT_CT_WINDOW
    if window is not None:
        return window_intensity(array, window)
    stored = np.dtype(array.dtype if dtype is None else dtype)
    if modality in PHOTOGRAPHIC_MODALITIES or (stored.kind in "ui" and stored.itemsize == 1):
        return dtype_range_intensity(array, stored)
    return percentile_intensity(array)


def to_channel_first(image: np.ndarray) -> np.ndarray:
    """A 2D image as (C, H, W): grey (H, W) or (H, W, 1) gives C = 1, RGB (H, W, 3) or RGBA (H, W, 4) gives
    C = 3 (alpha dropped)."""
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        return np.moveaxis(image[..., : min(image.shape[2], 3)], 2, 0)
    raise ValueError(f"expected a grey (H, W) or colour (H, W, 1|3|4) image, got shape {image.shape}")

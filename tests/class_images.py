"""The two-class images the classification tests draw: bright squares and dark horizontal stripes."""

from __future__ import annotations

import numpy as np


def class_pixels(name: str, rng: np.random.Generator) -> np.ndarray:
    """(32, 32) uint8 image of class ``name`` ("squares" or "stripes") over uniform noise in [0, 40)."""
    pixels = rng.integers(0, 40, (32, 32)).astype(np.uint8)
    if name == "squares":
        pixels[8:24, 8:24] = 220
    elif name == "stripes":
        pixels[::4] = 120
    else:
        raise ValueError(f"name must be 'squares' or 'stripes', got {name!r}.")
    return pixels

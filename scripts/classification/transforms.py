"""Reading one 2D image of any supported format into a channel-first float tensor for an encoder."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.data.intensity import normalise_intensity, to_channel_first
from scripts.data.manifest import canonical_modality
from scripts.data.readers import ImageReadError, read_image

__all__ = ["ReadImage2Dd", "read_image_2d"]


def read_image_2d(path: str, channels: int, modality: str = "other") -> torch.Tensor:
    """A 2D image file as a float32 tensor (channels, H, W) with values in [0, 1].

    The file is read by :func:`scripts.data.readers.read_image` (PNG, JPEG, NIfTI, DICOM), normalised by the rule
    of ``modality`` (:mod:`scripts.data.intensity`: 8-bit images / 255, CT by its HU window, other images by
    percentiles), and grey images are repeated to ``channels`` channels (the encoders take 3).

    Raises:
        ImageReadError: the file is missing, unreadable, holds NaN/Inf, is 3D, or has a channel count other
            than 1 or ``channels``; the message names the file.
    """
    array, header = read_image(path)
    if len(header.shape) == 3 and header.shape[2] != 1:
        raise ImageReadError(path, f"3D image of shape {header.shape}; this workflow takes 2D images")
    image = to_channel_first(normalise_intensity(array.reshape(header.shape[:2] + array.shape[len(header.shape):]),
                                                 modality, None, header.dtype))
    if image.shape[0] == 1 and channels > 1:
        image = np.repeat(image, channels, axis=0)
    if image.shape[0] != channels:
        raise ImageReadError(path, f"image has {image.shape[0]} channels but the network takes {channels}")
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))


class ReadImage2Dd(MapTransform):
    """Dictionary transform replacing the path under each key by the image read with :func:`read_image_2d`.

    MONAI's ``LoadImaged`` would also read these files, but neither rescales per modality nor turns a NaN pixel,
    a 3D file or a wrong channel count into an error that names the file; this transform reuses the bundle's
    readers, which do.

    Args:
        keys: keys holding image paths.
        channels: channels the network takes (grey images are repeated to this count).
        modality: intensity normalisation rule, one of ``scripts.data.manifest.MODALITIES``.

    Example::

        ReadImage2Dd("image", channels=3)({"image": "scan.png"})["image"].shape  # (3, H, W)
    """

    def __init__(self, keys: KeysCollection, channels: int = 3, modality: str = "other") -> None:
        super().__init__(keys)
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        self.channels = channels
        self.modality = canonical_modality(modality)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        result = dict(data)
        for key in self.key_iterator(result):
            result[key] = read_image_2d(str(result[key]), self.channels, self.modality)
        return result

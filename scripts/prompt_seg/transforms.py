"""Dictionary transforms of the box-prompted segmentation workflows (MedSAM-style data handling).

Pipeline (train): :class:`LoadImageLabeld` -> MONAI ``Resized``/``ScaleIntensityd`` -> :class:`EmbedImaged` (cached by
``CacheDataset``, the encoder being frozen) -> ``CopyItemsd``/``Resized`` (low-resolution label) ->
:class:`RandBoxPromptd`. Pipeline (infer): :class:`LoadImageLabeld` without label -> :class:`ScaleBoxesd` -> resize,
scale intensity.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable

from scripts.data.readers import read_image
from scripts.prompt_seg.boxes import box_from_mask, check_boxes_inside

__all__ = ["EmbedImaged", "LoadImageLabeld", "RandBoxPromptd", "ScaleBoxesd"]


class LoadImageLabeld(MapTransform):
    """Reads a 2D image (PNG/JPEG, 2D NIfTI, DICOM) and optionally its mask, with errors naming the file.

    Output: ``image`` (3, H, W) float32 (grey repeated to 3 channels, as SAM's encoder takes RGB), ``label``
    (1, H, W) float32 in {0, 1} (non-zero is foreground), ``original_shape`` (H, W) and ``{key}_path``.

    Args:
        image_key: key of the image path.
        label_key: key of the mask path; None for inference.
        require_foreground: raise when a mask is empty (no box can be derived from it).

    Raises:
        ValueError: a 3D image, an image with other than 1 or 3 channels, a multi-channel mask, a mask whose size
            differs from the image, or (with ``require_foreground``) an empty mask; the message names the file.
    """

    def __init__(self, image_key: str = "image", label_key: str | None = "label", require_foreground: bool = True) -> None:
        super().__init__([k for k in (image_key, label_key) if k is not None])
        self.image_key = image_key
        self.label_key = label_key
        self.require_foreground = require_foreground

    @staticmethod
    def _read_2d(path: Path, what: str) -> tuple[np.ndarray, int]:
        array, header = read_image(path)
        if len(header.shape) != 2:
            raise ValueError(
                f"{path}: {what} has spatial shape {header.shape}; prompt segmentation takes 2D images (export 3D "
                "volumes as 2D slices)"
            )
        return array, header.channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_path = Path(d[self.image_key])
        image, channels = self._read_2d(image_path, "the image")
        if channels not in (1, 3):
            raise ValueError(f"{image_path}: image has {channels} channels; expected 1 (grey) or 3 (RGB)")
        image = np.repeat(image[None], 3, axis=0) if channels == 1 else np.moveaxis(image, -1, 0)
        d[self.image_key] = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)
        d[f"{self.image_key}_path"] = str(image_path)
        d["original_shape"] = torch.tensor(image.shape[1:], dtype=torch.int64)
        if self.label_key is not None:
            label_path = Path(d[self.label_key])
            label, label_channels = self._read_2d(label_path, "the mask")
            if label_channels != 1:
                raise ValueError(f"{label_path}: mask has {label_channels} channels; expected a single-channel mask")
            if label.shape != image.shape[1:]:
                raise ValueError(
                    f"{label_path}: mask is {label.shape[0]} x {label.shape[1]} but its image {image_path} is "
                    f"{image.shape[1]} x {image.shape[2]}"
                )
            if self.require_foreground and not label.any():
                raise ValueError(
                    f"{label_path}: mask is empty, so no box prompt can be derived; drop it from the datalist (see "
                    "scripts.prompt_seg.datalist.load_prompt_seg_datalist(skip_empty=True))"
                )
            d[self.label_key] = torch.as_tensor(label[None] > 0, dtype=torch.float32)
            d[f"{self.label_key}_path"] = str(label_path)
        return d


class EmbedImaged(MapTransform):
    """Replaces ``image`` by its image embedding from the network's frozen encoder (computed once per case when the
    transform is inside a ``CacheDataset``; MedSAM's encoder is frozen, so this is exact and saves most of the compute).

    Args:
        network: a :class:`~scripts.networks.medsam.MedSAM`; its ``embed_images`` is called without gradients.
        device: where the encoder runs; the embedding is returned on the CPU.
        image_key: key of the (3, H, W) image.
        embedding_key: key of the (C, H/16, W/16) embedding.
        keep_image: keep ``image`` beside the embedding.
    """

    def __init__(
        self, network: torch.nn.Module, device: torch.device | str = "cpu", image_key: str = "image",
        embedding_key: str = "image_embedding", keep_image: bool = False,
    ) -> None:
        super().__init__([image_key])
        self.network = network
        self.device = torch.device(device)
        self.image_key = image_key
        self.embedding_key = embedding_key
        self.keep_image = keep_image

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = torch.as_tensor(d[self.image_key]).as_subclass(torch.Tensor)
        with torch.no_grad():
            d[self.embedding_key] = self.network.embed_images(image[None].to(self.device))[0].cpu()
        if not self.keep_image:
            del d[self.image_key]
        return d


class RandBoxPromptd(Randomizable, MapTransform):
    """Box prompt from the mask, each side pushed out by a random margin (MedSAM's training perturbation: 0 to 20
    pixels at 256 x 256, scaled here to the mask's size) and clipped to the image.

    Output ``box``: (4,) float32 (x_min, y_min, x_max, y_max) in pixels of the mask (module
    :mod:`scripts.prompt_seg.boxes`).

    Args:
        label_key: key of the (1, H, W) mask.
        box_key: key of the output box.
        max_margin: largest margin in pixels at ``reference_size``; 0 gives the tight box (validation).
        reference_size: image side the margin refers to.
    """

    def __init__(self, label_key: str = "label", box_key: str = "box", max_margin: float = 20.0,
                 reference_size: int = 256) -> None:
        super().__init__([label_key])
        if max_margin < 0 or reference_size < 1:
            raise ValueError(f"max_margin must be >= 0 and reference_size >= 1, got {max_margin} and {reference_size}.")
        self.label_key = label_key
        self.box_key = box_key
        self.max_margin = max_margin
        self.reference_size = reference_size
        self._margins = np.zeros(4)

    def randomize(self, data: Any = None) -> None:
        self._margins = self.R.uniform(0.0, 1.0, 4)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = np.asarray(torch.as_tensor(d[self.label_key]).detach().cpu())[0]
        try:
            box = box_from_mask(mask)
        except ValueError as error:
            raise ValueError(f"{d.get(f'{self.label_key}_path', self.label_key)}: {error}") from error
        self.randomize()
        h, w = mask.shape
        largest = np.floor(self.max_margin * max(h, w) / self.reference_size)
        margins = np.floor(self._margins * (largest + 1))  # integers 0..largest, as MedSAM's randint
        box = box + margins * np.array([-1, -1, 1, 1])
        d[self.box_key] = torch.as_tensor(np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1]), dtype=torch.float32)
        return d


class ScaleBoxesd(MapTransform):
    """Checks boxes against the image they were drawn on and maps them to the model's square input.

    A box covering pixels ``a..b`` of a side of ``n`` pixels covers ``a * s / n .. (b + 1) * s / n - 1`` after the
    image is resized to ``s`` pixels.

    Args:
        box_key: key of the (K, 4) boxes in pixels of the original image.
        spatial_size: side of the model input.
        shape_key: key of the original (H, W).
        path_key: key of the image path, named in errors.
    """

    def __init__(self, box_key: str = "boxes", spatial_size: int = 256, shape_key: str = "original_shape",
                 path_key: str = "image_path") -> None:
        super().__init__([box_key])
        self.box_key, self.spatial_size, self.shape_key, self.path_key = box_key, spatial_size, shape_key, path_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        boxes = np.asarray(d[self.box_key], dtype=np.float32).reshape(-1, 4)
        h, w = (int(v) for v in torch.as_tensor(d[self.shape_key]).reshape(-1))
        check_boxes_inside(boxes, (h, w), f"box for {d.get(self.path_key, 'image')}")
        scale = np.array([self.spatial_size / w, self.spatial_size / h] * 2, dtype=np.float32)
        scaled = boxes * scale + np.array([0, 0, scale[0] - 1, scale[1] - 1], dtype=np.float32)
        d[self.box_key] = torch.as_tensor(np.clip(scaled, 0, self.spatial_size - 1))
        return d

"""Batch preparation for MONAI's SupervisedTrainer/SupervisedEvaluator in the box-prompted workflows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["PromptBatch"]


class PromptBatch:
    """``prepare_batch`` turning a collated dict into ``(inputs, targets, (boxes,), {"embedded": ...})``, so that the
    engine calls ``MedSAM(inputs, boxes, embedded=...)``.

    Args:
        input_key: ``"image_embedding"`` (cached embeddings, ``embedded=True``) or ``"image"`` (raw images).
        target_key: key of the target mask (``"label_lowres"`` for the loss, ``"label"`` for validation), None at
            inference.
        box_key: key of the boxes: (B, 4), one per image, or (1, K, 4), K boxes of a single image.

    Example::

        trainer = SupervisedTrainer(..., prepare_batch=PromptBatch("image_embedding", "label_lowres"))
    """

    def __init__(self, input_key: str = "image_embedding", target_key: str | None = "label_lowres",
                 box_key: str = "box") -> None:
        self.input_key, self.target_key, self.box_key = input_key, target_key, box_key
        self.embedded = input_key != "image"

    def __call__(
        self, batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor], dict[str, bool]]:
        def plain(value: Any) -> torch.Tensor:
            tensor = torch.as_tensor(value).as_subclass(torch.Tensor)  # MetaTensor -> Tensor for the attention kernels
            return tensor.to(device=device, non_blocking=non_blocking)

        missing = [k for k in (self.input_key, self.box_key, self.target_key) if k is not None and k not in batchdata]
        if missing:
            raise KeyError(f"batch lacks {missing}; it has {sorted(batchdata)}")
        boxes = plain(batchdata[self.box_key]).float()
        if boxes.ndim == 3:
            if boxes.shape[0] != 1:
                raise ValueError(f"several boxes per image need a batch of one image, got boxes {tuple(boxes.shape)}")
            boxes = boxes[0]
        targets = plain(batchdata[self.target_key]) if self.target_key is not None else None
        return plain(batchdata[self.input_key]), targets, (boxes,), {"embedded": self.embedded}

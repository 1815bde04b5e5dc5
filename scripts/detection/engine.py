"""Glue between MONAI's RetinaNetDetector and MONAI/Ignite engines: box transforms, batches, loss, mAP, writer.

MONAI's ``SupervisedTrainer`` calls ``network(inputs, *args)`` then ``loss_function(pred, targets)``. In training
mode the detector takes the targets as an argument and returns its losses, so :class:`DetectionBatch` hands the
targets to the network and :func:`detection_loss` adds the losses up; in eval mode it returns detections, which
:class:`DetectionMAP` scores. Samples are not collated (images may differ in size): the data loaders use
``monai.data.utils.no_collation``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.config import KeysCollection
from monai.data.box_utils import box_iou
from monai.transforms import MapTransform

from scripts.atomic_save import write_atomically
from scripts.detection.detector import BOX_KEY, LABEL_KEY, SCORE_KEY

__all__ = [
    "BoxesToArrayOrderd",
    "DetectionBatch",
    "DetectionMAP",
    "DetectionWriter",
    "array_order_to_image_boxes",
    "detection_loss",
]

logger = logging.getLogger(__name__)


def _swap_axes(boxes: torch.Tensor) -> torch.Tensor:
    """[a0, b0, a1, b1] -> [b0, a0, b1, a1]: between (x, y) image order and MONAI's (row, column) array order."""
    return boxes[:, [1, 0, 3, 2]]


def array_order_to_image_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes (N, 4) in MONAI's array order [row_min, col_min, row_max, col_max] as [x_min, y_min, x_max, y_max]."""
    return _swap_axes(boxes)


class BoxesToArrayOrderd(MapTransform):
    """Turns datalist boxes ``[x_min, y_min, x_max, y_max]`` (x = column) into a float tensor (N, 4) in MONAI's
    ``StandardMode`` for a (C, H, W) image, ``[row_min, col_min, row_max, col_max]``, and labels into a long
    tensor (N,). Items without boxes get empty (0, 4) and (0,) tensors.

    Args:
        keys: the box key(s).
        label_key: the key of the labels belonging to the boxes.
    """

    def __init__(self, keys: KeysCollection = BOX_KEY, label_key: str = LABEL_KEY) -> None:
        super().__init__(keys)
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        result = dict(data)
        for key in self.key_iterator(result):
            boxes = torch.as_tensor(result[key], dtype=torch.float32).reshape(-1, 4)
            result[key] = _swap_axes(boxes)
            result[self.label_key] = torch.as_tensor(result.get(self.label_key, []), dtype=torch.long).reshape(-1)
            if len(result[self.label_key]) != len(boxes):
                raise ValueError(f"{len(boxes)} boxes but {len(result[self.label_key])} labels in {data.get('path')}")
        return result


class DetectionBatch:
    """``prepare_batch`` for engines driving a ``RetinaNetDetector`` on uncollated samples.

    Returns the list of images (C, H, W) and the list of targets ``{"box", "label"}`` on ``device``; for
    training (``targets_to_network=True``) the targets are also passed to the network as its second argument.

    Args:
        targets_to_network: True for the trainer, False for evaluators.
        image_key: key of the image in each sample.
    """

    def __init__(self, targets_to_network: bool, image_key: str = "image") -> None:
        self.targets_to_network = targets_to_network
        self.image_key = image_key

    def __call__(self, batch: Sequence[Mapping[str, Any]], device: torch.device | str | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> tuple:
        images = [torch.as_tensor(sample[self.image_key]).to(device=device, non_blocking=non_blocking)
                  for sample in batch]
        targets = [
            {key: torch.as_tensor(sample[key]).to(device=device, non_blocking=non_blocking) for key in (BOX_KEY, LABEL_KEY)}
            for sample in batch if BOX_KEY in sample
        ]
        if self.targets_to_network:
            return images, targets, (targets,), {}
        return images, targets or None


def detection_loss(losses: Mapping[str, torch.Tensor], targets: Any = None) -> torch.Tensor:
    """The detector's training losses (classification + box regression) as one scalar; ``targets`` is unused
    (the detector already used them), it is there for ``SupervisedTrainer``'s ``loss_function(pred, targets)``."""
    return sum(losses.values())  # type: ignore[return-value]


class DetectionMAP(Metric):
    """Mean average precision of detections at an IoU threshold, COCO style, with MONAI's detection metrics
    (``matching_batch`` and ``COCOMetric``: 101-point interpolated precision, averaged over classes).

    ``update`` takes ``(predictions, targets)``: lists (one per image) of dicts, predictions with ``"box"``,
    ``"label"``, ``"label_scores"``, targets with ``"box"``, ``"label"``, boxes in MONAI's ``StandardMode``.

    Args:
        class_names: names of the classes, in label order.
        iou_threshold: IoU at which a detection matches a box (0.5 for mAP@0.5).
        max_detections: most detections per image scored (highest scores first).
        output_transform: maps the engine output to ``(predictions, targets)``.

    Example::

        DetectionMAP(["lesion"]).attach(evaluator, "val_map50")
    """

    def __init__(
        self,
        class_names: Sequence[str],
        iou_threshold: float = 0.5,
        max_detections: int = 100,
        output_transform: Any = lambda output: (output["pred"], output["label"]),
        device: str | torch.device = torch.device("cpu"),
    ) -> None:
        if not class_names:
            raise ValueError("class_names must name at least one class")
        if not 0.0 < iou_threshold < 1.0:
            raise ValueError(f"iou_threshold must lie in (0, 1), got {iou_threshold}")
        self.class_names = list(class_names)
        self.iou_threshold = float(iou_threshold)
        self.max_detections = int(max_detections)
        self._coco = COCOMetric(classes=self.class_names, iou_list=(self.iou_threshold,),
                                iou_range=(self.iou_threshold, self.iou_threshold, 0.05),
                                max_detection=(self.max_detections,), verbose=False)
        self._key = f"AP_IoU_{self.iou_threshold:.2f}_MaxDet_{self.max_detections}"
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._results: list[dict[int, dict[str, np.ndarray]]] = []

    def update(self, output: tuple[Sequence[Mapping[str, torch.Tensor]], Sequence[Mapping[str, torch.Tensor]]]) -> None:
        predictions, targets = output
        if targets is None or len(predictions) != len(targets):
            raise ValueError(f"DetectionMAP needs one target per prediction, got {len(predictions)} predictions and "
                             f"{0 if targets is None else len(targets)} targets")

        def numpy(value: torch.Tensor) -> np.ndarray:
            return value.detach().float().cpu().numpy() if value.is_floating_point() else value.detach().cpu().numpy()

        self._results += matching_batch(
            iou_fn=box_iou,
            iou_thresholds=self._coco.iou_thresholds,
            pred_boxes=[numpy(p[BOX_KEY]) for p in predictions],
            pred_classes=[numpy(p[LABEL_KEY]) for p in predictions],
            pred_scores=[numpy(p[SCORE_KEY]) for p in predictions],
            gt_boxes=[numpy(t[BOX_KEY]) for t in targets],
            gt_classes=[numpy(t[LABEL_KEY]) for t in targets],
            max_detections=self.max_detections,
        )

    def compute(self) -> float:
        if not self._results:
            raise ValueError("DetectionMAP has no images to score")
        return float(self._coco(self._results)[0][self._key])


class DetectionWriter:
    """Writes the detections of every image to a JSON file ``{image path: [{"box": [x_min, y_min, x_max, y_max],
    "label": class name, "score": float}, ...]}`` (boxes back in the datalist's image convention), atomically
    when the run completes.

    Args:
        path: the JSON file.
        class_names: names of the labels.
        path_key: key of each sample holding its image path.
    """

    def __init__(self, path: str | Path, class_names: Sequence[str], path_key: str = "path") -> None:
        self.path = Path(path)
        self.class_names = list(class_names)
        self.path_key = path_key
        self.detections: dict[str, list[dict[str, Any]]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.detections = {}

    def _collect(self, engine: Engine) -> None:
        for sample, prediction in zip(engine.state.batch, engine.state.output["pred"]):
            boxes = array_order_to_image_boxes(prediction[BOX_KEY].detach().float().cpu().reshape(-1, 4))
            self.detections[str(sample[self.path_key])] = [
                {"box": [round(v, 2) for v in box], "label": self.class_names[int(label)], "score": round(float(score), 4)}
                for box, label, score in zip(boxes.tolist(), prediction[LABEL_KEY].tolist(),
                                             prediction[SCORE_KEY].tolist())
            ]

    def _write(self, engine: Engine) -> None:
        text = json.dumps(self.detections, indent=1)
        write_atomically(self.path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
        logger.info("detections of %d images written to %s", len(self.detections), self.path)

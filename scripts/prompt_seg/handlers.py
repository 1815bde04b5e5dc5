"""Ignite handlers of the box-prompted workflows: untrained-vs-trained report and mask writing."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from PIL import Image

from scripts.atomic_save import write_atomically

__all__ = ["BaselineComparison", "PromptMaskWriter"]

logger = logging.getLogger(__name__)


class BaselineComparison:
    """Reports the validation metric before training (the untrained baseline; run the validation at start, e.g.
    ``ValidationHandler(exec_at_start=True)``) and after the last epoch, and writes both to ``output_file``.

    Args:
        evaluator: the validation engine, whose ``state.metrics[metric_name]`` is read after each run.
        metric_name: the metric, e.g. ``"val_mean_dice"``.
        output_file: JSON file for ``{"untrained": ..., "trained": ..., "history": [...]}``; None writes nothing.
    """

    def __init__(self, evaluator: Engine, metric_name: str = "val_mean_dice", output_file: str | Path | None = None) -> None:
        self.evaluator = evaluator
        self.metric_name = metric_name
        self.output_file = Path(output_file) if output_file is not None else None
        self.history: list[float] = []

    def attach(self, engine: Engine) -> None:
        self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._record)
        engine.add_event_handler(Events.COMPLETED, self._report)

    def _record(self, evaluator: Engine) -> None:
        if self.metric_name not in evaluator.state.metrics:
            raise KeyError(f"validation has no metric {self.metric_name!r}; it has {sorted(evaluator.state.metrics)}")
        self.history.append(float(evaluator.state.metrics[self.metric_name]))

    def _report(self, engine: Engine) -> None:
        if len(self.history) < 2:
            logger.warning("%s: fewer than two validation runs, no untrained/trained comparison", self.metric_name)
            return
        summary = {"untrained": self.history[0], "trained": self.history[-1], "history": self.history}
        message = f"{self.metric_name}: untrained baseline {summary['untrained']:.4f} -> trained {summary['trained']:.4f}"
        logger.info(message)
        print(message, flush=True)
        if self.output_file is not None:
            write_atomically(self.output_file, lambda temporary: temporary.write_text(json.dumps(summary, indent=1)))


_IMAGE_SUFFIX = re.compile(r"(\.nii\.gz|\.nii|\.png|\.jpe?g|\.dcm|\.dicom|\.ima)$", re.IGNORECASE)


class PromptMaskWriter:
    """Writes one PNG mask per image at its original size: pixel value ``k`` where box ``k`` (1-based, in box-file
    order) predicts foreground with the highest logit, 0 elsewhere.

    Reads ``engine.state.output["pred"]`` (K, 1, h, w) logits of the K boxes of one image (evaluator with
    ``decollate=False`` and batch size 1) and ``engine.state.batch`` (``image_path``, ``original_shape``).

    Args:
        output_dir: folder of the masks, named ``{image name without suffix}_mask.png``.
        threshold: logit above which a pixel is foreground (0 is probability 0.5).
    """

    def __init__(self, output_dir: str | Path, threshold: float = 0.0) -> None:
        self.output_dir = Path(output_dir)
        self.threshold = threshold

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        batch, logits = engine.state.batch, engine.state.output["pred"]
        paths = batch["image_path"]
        if len(paths) != 1:
            raise ValueError(f"PromptMaskWriter needs batches of one image, got {len(paths)}")
        height, width = (int(v) for v in torch.as_tensor(batch["original_shape"]).reshape(-1))
        if logits.shape[0] > 255:
            raise ValueError(f"{paths[0]}: {logits.shape[0]} boxes do not fit the values of an 8-bit PNG mask")
        full = F.interpolate(logits.detach().float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        best, index = full.max(dim=0)
        labels = torch.where(best > self.threshold, index + 1, torch.zeros_like(index))
        mask = labels.cpu().numpy().astype(np.uint8)
        target = self.output_dir / (_IMAGE_SUFFIX.sub("", Path(paths[0]).name) + "_mask.png")
        write_atomically(target, lambda temporary: Image.fromarray(mask).save(temporary, format="PNG"))
        logger.info("mask of %s written to %s", paths[0], target)

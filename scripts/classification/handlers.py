"""Ignite handlers of the classification workflows: probabilities to CSV, and metrics against the untrained baseline."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.metrics import MetricsLambda, Precision, Recall

from scripts.atomic_save import write_atomically

__all__ = [
    "BaselineComparison",
    "ClassProbabilityWriter",
    "logits_and_labels",
    "per_class_metrics",
    "probabilities_and_onehot",
]

logger = logging.getLogger(__name__)


def logits_and_labels(output: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pred (N, C) logits, label (N,) class indices)`` of a batched (not decollated) engine output, for
    Ignite's ``Accuracy`` and ``ClassificationReport``."""
    return output["pred"], output["label"].long().view(-1)


def probabilities_and_onehot(output: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax probabilities (N, C), one-hot labels (N, C))`` for MONAI's ``ROCAUC`` handler (one AUC per
    class, one-versus-rest; for two classes both equal the binary AUC)."""
    logits, labels = logits_and_labels(output)
    return torch.softmax(logits.float(), dim=1), torch.nn.functional.one_hot(labels, logits.shape[1])


def per_class_metrics(
    class_names: Sequence[str], prefix: str = "val_", output_transform: Callable = logits_and_labels
) -> MetricsLambda:
    """Precision, recall and F1 of every class as separate scalars ``{prefix}{class}_{precision|recall|f1}``.

    Built from Ignite's ``Precision``/``Recall`` with ``average=False``; unlike Ignite's ``ClassificationReport``
    (a nested dict, whose per-class keys collide when MONAI's ``StatsHandler`` flattens it), each value is a
    named scalar that ``StatsHandler`` and ``TensorBoardStatsHandler`` log.
    """
    names = list(class_names)
    precision = Precision(average=False, output_transform=output_transform)
    recall = Recall(average=False, output_transform=output_transform)

    def table(precisions: torch.Tensor, recalls: torch.Tensor) -> dict[str, float]:
        if len(precisions) != len(names):
            raise ValueError(f"{len(precisions)} classes predicted but {len(names)} class names given: {names}")
        result = {}
        for name, p, r in zip(names, precisions.tolist(), recalls.tolist()):
            result.update({f"{prefix}{name}_precision": p, f"{prefix}{name}_recall": r,
                           f"{prefix}{name}_f1": 2 * p * r / (p + r) if p + r > 0 else 0.0})
        return result

    return MetricsLambda(table, precision, recall, metrics_result_mode="flatten")


class ClassProbabilityWriter:
    """Writes one CSV row per image: its path, the predicted class and the softmax probability of every class.

    MONAI's ``ClassificationSaver`` writes rows without column names and not atomically; this handler names the
    columns after the classes (``image,prediction,p_<class>...``) and writes the whole file at the end of the run
    through a temporary file.

    Args:
        path: the CSV file to write.
        class_names: names of the logits, in order.
        path_key: key of the batch holding each image's path (copied before the image is read).
    """

    def __init__(self, path: str | Path, class_names: Sequence[str], path_key: str = "path") -> None:
        if len(class_names) < 2:
            raise ValueError(f"class_names must name at least two classes, got {list(class_names)}")
        self.path = Path(path)
        self.class_names = list(class_names)
        self.path_key = path_key
        self.rows: list[list[str]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        logits = engine.state.output["pred"]
        if logits.ndim != 2 or logits.shape[1] != len(self.class_names):
            raise ValueError(f"predictions of shape {tuple(logits.shape)} do not match the {len(self.class_names)} "
                             f"classes {self.class_names}")
        probabilities = torch.softmax(logits.detach().float(), dim=1).cpu()
        for path, row in zip(engine.state.batch[self.path_key], probabilities):
            self.rows.append([str(path), self.class_names[int(row.argmax())], *(f"{p:.6f}" for p in row.tolist())])

    def _write(self, engine: Engine) -> None:
        def write(temporary: Path) -> None:
            with temporary.open("w", newline="", encoding="utf-8") as file:
                writer = csv.writer(file)
                writer.writerow(["image", "prediction", *(f"p_{name}" for name in self.class_names)])
                writer.writerows(self.rows)

        write_atomically(self.path, write)
        logger.info("class probabilities of %d images written to %s", len(self.rows), self.path)


class BaselineComparison:
    """Remembers an evaluator's metrics at its first run (the untrained baseline, when the validation handler runs
    at start) and logs every later value beside it; optionally writes both to a JSON file.

    Args:
        metric_names: names in ``engine.state.metrics`` to follow (scalars).
        path: JSON file written after each evaluation ``{"baseline": {...}, "latest": {...}}``; None writes none.

    Example::

        BaselineComparison(["val_accuracy"], "runs/cls/metrics.json").attach(evaluator)
    """

    def __init__(self, metric_names: Sequence[str], path: str | Path | None = None) -> None:
        if not metric_names:
            raise ValueError("metric_names must name at least one metric")
        self.metric_names = list(metric_names)
        self.path = None if path is None else Path(path)
        self.baseline: dict[str, float] | None = None
        self.latest: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        missing = [name for name in self.metric_names if name not in engine.state.metrics]
        if missing:
            raise ValueError(f"metrics {missing} are not computed by the evaluator; it has {list(engine.state.metrics)}")
        values = {name: float(engine.state.metrics[name]) for name in self.metric_names}
        if self.baseline is None:
            self.baseline = values
            logger.info("untrained baseline: %s", ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        else:
            logger.info("after training: %s", ", ".join(
                f"{k} {v:.4f} (untrained baseline {self.baseline[k]:.4f})" for k, v in values.items()))
        self.latest = values
        if self.path is not None:
            text = json.dumps({"baseline": self.baseline, "latest": self.latest},
                              indent=2)
            write_atomically(self.path, lambda temporary: temporary.write_text(text, encoding="utf-8"))

"""Segmentation handlers: the best (or, without validation data, the last) network as a plain state dict
(``models/model.pt``) with its settings beside it (``models/model.settings.json``), per-class metric tables."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from scripts.atomic_save import save_atomically, write_atomically
from scripts.model_settings import write_settings

__all__ = ["BestModelSaver", "ClassMetricsWriter", "FinalModelSaver", "save_network"]

logger = logging.getLogger(__name__)


def save_network(network: nn.Module, path: Path, settings: Mapping[str, Any] | None = None) -> None:
    """Writes ``network.state_dict()`` (on CPU) to ``path`` atomically, on rank 0 only (every rank holds the same
    weights under DDP), then its ``settings`` beside it (``scripts.model_settings.write_settings``) when given."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return
    save_atomically({key: tensor.detach().cpu() for key, tensor in network.state_dict().items()}, path)
    if settings is not None:
        write_settings(path, settings)


class BestModelSaver:
    """After each validation, writes ``network.state_dict()`` to ``path`` when the key metric improved.

    MONAI's ``CheckpointSaver`` can keep the best model too, but writes non-atomically; this handler writes to a
    temporary file and renames it (``scripts.atomic_save``), only on rank 0, and stores its best value in its
    ``state_dict`` so that a resumed run (``ResumeFromLatest``) does not overwrite a better model with a worse one.

    Args:
        network: the network (not its DistributedDataParallel wrapper), e.g. ``@network_def``.
        path: destination, e.g. ``models/model.pt``.
        metric_name: metric to maximise; default: the evaluator's key metric.
        settings: the settings the network is trained with, written beside it (``models/model.settings.json``)
            for the workflows that use it; None writes none.

    Example (bundle config, in the evaluator's handlers)::

        {"_target_": "scripts.segmentation.handlers.BestModelSaver", "network": "@network_def",
         "path": "$os.path.join(@bundle_root, 'models', 'model.pt')", "settings": "@run_settings"}
    """

    def __init__(self, network: nn.Module, path: str | Path, metric_name: str | None = None,
                 settings: Mapping[str, Any] | None = None) -> None:
        self.network = network
        self.path = Path(path)
        self.metric_name = metric_name
        self.settings = settings
        self.best = -math.inf

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best = float(state["best"])

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise ValueError(f"BestModelSaver: metric {name!r} is not among the evaluator's metrics "
                             f"{sorted(engine.state.metrics)}.")
        value = float(engine.state.metrics[name])
        if not value > self.best:  # NaN never counts as an improvement
            return
        self.best = value
        save_network(self.network, self.path, self.settings)
        logger.info("best %s %.4f: network saved to %s", name, value, self.path)


class FinalModelSaver:
    """When training completes without any validation result, writes ``network.state_dict()`` to ``path``: the
    last network, for runs where ``best_model_saver`` never saw a metric (no validation data, or fewer epochs than
    the validation interval).

    MONAI Label's ``BundleTrainTask`` splits the labelled images 80/20; with fewer than five the validation list it
    passes is empty (``configs/train.json`` then disables its ``ValidationHandler``), and the run must still update
    the weights it serves. A run that validated keeps the best network ``best_model_saver`` wrote.

    Args:
        network: the network (not its DistributedDataParallel wrapper), e.g. ``@network_def``.
        path: destination, e.g. ``models/model.pt`` (the same as ``best_model_saver``'s).
        best_model_saver: the validation's :class:`BestModelSaver` (whose ``settings`` are written beside it).
    """

    def __init__(self, network: nn.Module, path: str | Path, best_model_saver: BestModelSaver) -> None:
        self.network = network
        self.path = Path(path)
        self.best_model_saver = best_model_saver

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.best_model_saver.best > -math.inf:
            return
        save_network(self.network, self.path, self.best_model_saver.settings)
        logger.info("training finished at epoch %d: last network saved to %s", engine.state.epoch, self.path)


class ClassMetricsWriter:
    """At the end of an evaluation, writes a CSV with, for each metric, its mean over images per class (by the
    class's name) and its mean over classes.

    MONAI's ``MetricsSaver`` writes per-image tables and summaries too, but names the columns ``class0``,
    ``class1`` ... by position after the background was dropped; this table names them. Metrics must be computed
    with ``save_details=True``. NaN values (a class absent from both prediction and label) are left out of the
    means.

    Args:
        path: the CSV file, e.g. ``runs/evaluate/per_class_metrics.csv``.
        class_names: names of the classes in the metrics' channel order (foreground classes when the metrics
            exclude the background).

    Example of the file::

        metric,dim object,bright object,mean
        mean_dice,0.9012,0.9420,0.9216
    """

    def __init__(self, path: str | Path, class_names: Sequence[str]) -> None:
        self.path = Path(path)
        self.class_names = list(class_names)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        details = getattr(engine.state, "metric_details", None) or {}
        rows = []
        for metric, values in details.items():
            table = torch.as_tensor(values, dtype=torch.float64).reshape(-1, torch.as_tensor(values).shape[-1])
            if table.shape[1] != len(self.class_names):
                raise ValueError(f"ClassMetricsWriter: metric {metric} has {table.shape[1]} classes but "
                                 f"{len(self.class_names)} class names were given ({self.class_names}).")
            per_class = table.nanmean(dim=0).tolist()
            rows.append([metric, *(f"{value:.4f}" for value in per_class), f"{float(engine.state.metrics[metric]):.4f}"])
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["metric", *self.class_names, "mean"])
        writer.writerows(rows)
        write_atomically(self.path, lambda temporary: temporary.write_text(buffer.getvalue()))
        logger.info("per-class metrics written to %s", self.path)

"""Online monitors of representation quality during pretraining, on the images being pretrained on.

Label-free figures (collapse, effective rank, alignment and uniformity) are computed on a fixed, evenly spread
subset of the pretraining images themselves (:func:`spread_subset`), so they describe the user's own data;
the kNN accuracy needs labels: it reads a labelled datalist when one is given (:func:`labelled_data_loader`),
otherwise the labels of the pretraining images' datasets (a manifest entry's ``label``, by default its
modality) when they hold at least two; every log line names the set it was computed on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.transforms import Compose
from torch.utils.data import Subset

from scripts.classification.datalist import load_split, read_datalist
from scripts.classification.transforms import ReadImage2Dd
from scripts.networks.ssl_network import LVMMedNetwork
from scripts.transforms.monitor_view import monitor_transform

__all__ = [
    "EmbeddingMonitor",
    "KNN_SPLITS",
    "alignment",
    "effective_rank",
    "knn_accuracy",
    "labelled_data_loader",
    "second_view",
    "spread_subset",
    "uniformity",
]

logger = logging.getLogger(__name__)

KNN_SPLITS = ("training", "validation")  # the splits of a labelled datalist that the kNN monitor reads
_SECOND_VIEW_CROP = 0.8  # side share of the centred crop that, flipped, is each image's second view


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Leave-one-out accuracy of a cosine k-nearest-neighbour majority vote.

    Args:
        features: (M, D) features of M labelled images.
        labels: (M,) integer labels.
        k: neighbours voting (capped at M - 1).
    """
    if features.shape[0] < 2:
        raise ValueError(f"kNN accuracy needs at least 2 labelled images, got {features.shape[0]}.")
    unit = F.normalize(features.float(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    neighbours = similarity.topk(min(k, features.shape[0] - 1), dim=1).indices
    votes = F.one_hot(labels[neighbours], int(labels.max()) + 1).sum(1)
    return float((votes.argmax(1) == labels).float().mean())


def effective_rank(embeddings: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of centred (M, F) embeddings (Roy & Vetterli, 2007)."""
    centred = embeddings.float() - embeddings.float().mean(0)
    singular = torch.linalg.svdvals(centred)
    p = singular / singular.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


def alignment(first: torch.Tensor, second: torch.Tensor) -> float:
    """Mean squared distance between the unit embeddings (M, F) of two views of the same M images (Wang & Isola,
    ICML 2020, alpha = 2): 0 when the views embed alike, up to 4."""
    return float((F.normalize(first.float(), dim=1) - F.normalize(second.float(), dim=1)).pow(2).sum(1).mean())


def uniformity(embeddings: torch.Tensor) -> float:
    """log of the mean Gaussian potential exp(-2 |zi - zj|^2) over pairs of unit embeddings (M, F) (Wang & Isola,
    ICML 2020, t = 2): 0 when all collapse to one point, lower when they spread over the sphere."""
    if embeddings.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 embeddings, got {embeddings.shape[0]}.")
    distances = torch.pdist(F.normalize(embeddings.float(), dim=1)).pow(2)
    return float(distances.mul(-2).exp().mean().log())


def second_view(images: torch.Tensor) -> torch.Tensor:
    """A fixed second view of (N, C, H, W) images for :func:`alignment`: the centred crop of
    ``_SECOND_VIEW_CROP`` of each side, flipped left-right and resized back to (H, W)."""
    height, width = images.shape[-2:]
    top, left = round(height * (1 - _SECOND_VIEW_CROP) / 2), round(width * (1 - _SECOND_VIEW_CROP) / 2)
    crop = images[..., top:height - top, left:width - left].flip(-1)
    return F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)


def spread_subset(dataset: Dataset, size: int | None) -> Dataset | Subset:
    """At most ``size`` samples of ``dataset`` at evenly spaced indices (every dataset of a manifest keeps its
    share, and the same samples are monitored every epoch); the whole dataset when ``size`` is None or larger.

    Raises:
        ValueError: ``size`` is not a positive integer (or None).
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"monitor_samples must be a positive integer or None, got {size!r}")
    if size is None or size >= len(dataset):
        return dataset
    return Subset(dataset, np.linspace(0, len(dataset) - 1, size).round().astype(int).tolist())


def labelled_data_loader(datalist: str | Path, image_size: int, batch_size: int = 64) -> DataLoader:
    """The labelled 2D images of a classification datalist (``scripts.classification.datalist``: ``classes`` and
    image/label items; paths relative to its folder) for the kNN monitor: the items of its ``training`` and
    ``validation`` splits, read by the bundle's readers, in [0, 1], resized to ``image_size``² and normalised as
    the SSL views (:func:`scripts.transforms.monitor_view.monitor_transform`).

    Raises:
        FileNotFoundError: the datalist or one of its images does not exist (named).
        ValueError: the datalist has neither split, or an item is malformed or has an unknown label (named).
    """
    document = read_datalist(datalist)
    splits = [split for split in KNN_SPLITS if split in document]
    if not splits:
        raise ValueError(f"knn_datalist {datalist}: has none of the splits {', '.join(KNN_SPLITS)}")
    items = [item for split in splits for item in load_split(datalist, split)]
    transform = Compose([ReadImage2Dd("image", channels=3), monitor_transform(image_size)])
    return DataLoader(Dataset(items, transform), batch_size=batch_size, shuffle=False)


class EmbeddingMonitor:
    """Every ``interval`` epochs, embeds the monitored images and writes to ``engine.state.metrics``:

    - ``embedding_std``: mean per-dimension std of the L2-normalised projector embeddings (about 1/sqrt(F) when
      spread out, 0 when collapsed);
    - ``effective_rank``: effective rank of the projector embeddings;
    - ``alignment`` and ``uniformity`` (:func:`alignment` between each image and its :func:`second_view`,
      :func:`uniformity`) of the projector embeddings;
    - ``knn_accuracy``: leave-one-out kNN accuracy of the encoder's pooled features, on ``knn_loader`` when given,
      else on the labels of ``data_loader`` when they hold at least two classes (otherwise it is left out and the
      log says why).

    At the start of the run the same figures are logged for the network as it is then (the randomly-initialised
    network of a fresh run, or the weights it continues from) and the kNN accuracy is kept as
    ``knn_accuracy_at_start``; when the run completes, both kNN accuracies are logged side by side.

    Args:
        network: the ``LVMMedNetwork`` being trained (unwrapped from DDP).
        data_loader: the monitored pretraining images, batches with ``image_key`` (N, C, H, W) and, optionally,
            ``label_key`` (N labels: class names or numbers).
        interval: epochs between evaluations.
        k: neighbours of the kNN vote.
        data_name: what ``data_loader`` holds, for the log (e.g. the manifest or folder).
        knn_loader: labelled images for the kNN accuracy, same batch layout; None to use ``data_loader``'s labels.
        knn_name: what ``knn_loader`` holds, for the log (e.g. the datalist's path).
    """

    def __init__(
        self,
        network: LVMMedNetwork,
        data_loader: Iterable,
        interval: int = 1,
        k: int = 5,
        image_key: str = "image",
        label_key: str = "label",
        data_name: str = "the monitored images",
        knn_loader: Iterable | None = None,
        knn_name: str = "the labelled images",
    ) -> None:
        if interval < 1 or k < 1:
            raise ValueError(f"interval and k must be positive, got {interval} and {k}.")
        self.network = network
        self.data_loader = data_loader
        self.interval = interval
        self.k = k
        self.image_key = image_key
        self.label_key = label_key
        self.data_name = data_name
        self.knn_loader = knn_loader
        self.knn_name = knn_name if knn_loader is not None else f"the dataset labels of {data_name}"
        self.at_start: dict[str, float] = {}
        self.at_start_iteration = 0
        self.data_size = 0  # images monitored, and (images, classes) of the kNN set, at the last evaluation
        self.knn_size = (0, 0)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._at_start)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._at_end)

    def _embed(self, loader: Iterable, views: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list]:
        """Pooled encoder features, projector embeddings, embeddings of the second views (when ``views``) and
        labels (None where a batch has none) of every image of ``loader``."""
        device = next(self.network.parameters()).device
        pooled, embedded, seconds, labels = [], [], [], []
        for batch in loader:
            images = torch.as_tensor(batch[self.image_key]).to(device)
            features = self.network.encoder(images)[1]
            pooled.append(features.cpu())
            embedded.append(self.network.projector(features).cpu())
            if views:
                seconds.append(self.network.projector(self.network.encoder(second_view(images))[1]).cpu())
            names = batch.get(self.label_key) if isinstance(batch, dict) else None
            labels.extend(list(names) if names is not None else [None] * len(images))
        return torch.cat(pooled), torch.cat(embedded), torch.cat(seconds) if views else None, labels

    def _knn(self, features: torch.Tensor, labels: list) -> float | None:
        names = sorted({str(label) for label in labels if label is not None})
        self.knn_size = (len(labels), len(names))
        if len(names) < 2 or any(label is None for label in labels):
            return None
        label_ids = torch.tensor([names.index(str(label)) for label in labels])
        return knn_accuracy(features, label_ids, self.k)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The figures for the network as it is now (``knn_accuracy`` only where labels allow it)."""
        was_training = self.network.training
        self.network.eval()
        try:
            pooled, embeddings, seconds, labels = self._embed(self.data_loader, views=True)
            self.data_size = len(embeddings)
            figures = {
                "embedding_std": float(F.normalize(embeddings, dim=1).std(0).mean()),
                "effective_rank": effective_rank(embeddings),
                "alignment": alignment(embeddings, seconds),
                "uniformity": uniformity(embeddings),
            }
            if self.knn_loader is not None:
                pooled, _, _, labels = self._embed(self.knn_loader, views=False)
            accuracy = self._knn(pooled, labels)
        finally:
            self.network.train(was_training)
        if accuracy is not None:
            figures["knn_accuracy"] = accuracy
        return figures

    def _describe(self, figures: dict[str, float]) -> str:
        label_free = ", ".join(f"{name} {value:.3f}" for name, value in figures.items() if name != "knn_accuracy")
        images, classes = self.knn_size
        if "knn_accuracy" in figures:
            knn = f"kNN accuracy {figures['knn_accuracy']:.3f} on {self.knn_name} ({images} images, {classes} classes)"
        else:
            knn = (f"no kNN accuracy: {self.knn_name} ({images} images) hold {classes} label(s), a kNN vote needs "
                   "two or more (give labelled images with knn_datalist)")
        return f"{label_free} on {self.data_name} ({self.data_size} images); {knn}"

    def _at_start(self, engine: Engine) -> None:
        self.at_start = self.evaluate()
        self.at_start_iteration = engine.state.iteration
        if "knn_accuracy" in self.at_start:
            engine.state.metrics["knn_accuracy_at_start"] = self.at_start["knn_accuracy"]
        logger.info("at start (iteration %d): %s", engine.state.iteration, self._describe(self.at_start))

    def __call__(self, engine: Engine) -> None:
        figures = self.evaluate()
        engine.state.metrics.update(figures)
        logger.info("epoch %d: %s", engine.state.epoch, self._describe(figures))

    def _at_end(self, engine: Engine) -> None:
        if "effective_rank" not in engine.state.metrics or engine.state.epoch % self.interval:
            self(engine)  # the last epoch was not evaluated
        start, end = self.at_start.get("knn_accuracy"), engine.state.metrics.get("knn_accuracy")
        if start is None or end is None:
            return
        logger.info(
            "kNN accuracy on %s: %.3f at the start of this run (iteration %d), %.3f after training (iteration %d): %s",
            self.knn_name, start, self.at_start_iteration, end, engine.state.iteration,
            "improved" if end > start else "not improved",
        )


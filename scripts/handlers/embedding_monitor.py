"""Online monitors of representation quality during pretraining: kNN accuracy and embedding collapse."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from scripts.networks.ssl_network import LVMMedNetwork

__all__ = ["EmbeddingMonitor", "knn_accuracy", "effective_rank"]

logger = logging.getLogger(__name__)


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


class EmbeddingMonitor:
    """Every ``interval`` epochs, embeds a labelled split and writes to ``engine.state.metrics``:

    - ``knn_accuracy``: leave-one-out kNN accuracy of the encoder's pooled features;
    - ``embedding_std``: mean per-dimension std of the L2-normalised projector embeddings
      (about 1/sqrt(F) when spread out, 0 when collapsed);
    - ``effective_rank``: effective rank of the projector embeddings.

    At the start of the run the same figures are logged for the network as it is then (the
    randomly-initialised network of a fresh run) and kept as ``knn_accuracy_at_start``; when the run
    completes, both kNN accuracies are logged side by side.

    Args:
        network: the ``LVMMedNetwork`` being trained (unwrapped from DDP).
        data_loader: labelled images, batches with ``image_key`` (N, C, H, W) and ``label_key`` (N labels:
            class names or numbers).
        interval: epochs between evaluations.
        k: neighbours of the kNN vote.
    """

    def __init__(
        self,
        network: LVMMedNetwork,
        data_loader: Iterable,
        interval: int = 1,
        k: int = 5,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        if interval < 1 or k < 1:
            raise ValueError(f"interval and k must be positive, got {interval} and {k}.")
        self.network = network
        self.data_loader = data_loader
        self.interval = interval
        self.k = k
        self.image_key = image_key
        self.label_key = label_key
        self.at_start: dict[str, float] = {}
        self.at_start_iteration = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._at_start)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._at_end)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The three figures for the network as it is now."""
        was_training = self.network.training
        self.network.eval()
        device = next(self.network.parameters()).device
        pooled, embedded, labels = [], [], []
        for batch in self.data_loader:
            images = torch.as_tensor(batch[self.image_key]).to(device)
            features = self.network.encoder(images)[1]
            pooled.append(features.cpu())
            embedded.append(self.network.projector(features).cpu())
            labels.extend(list(batch[self.label_key]))
        self.network.train(was_training)
        embeddings = torch.cat(embedded)
        # labels may be class names or numbers: number them in sorted order
        names = sorted({str(label) for label in labels})
        label_ids = torch.tensor([names.index(str(label)) for label in labels])
        return {
            "knn_accuracy": knn_accuracy(torch.cat(pooled), label_ids, self.k),
            "embedding_std": float(F.normalize(embeddings, dim=1).std(0).mean()),
            "effective_rank": effective_rank(embeddings),
        }

    def _at_start(self, engine: Engine) -> None:
        self.at_start = self.evaluate()
        self.at_start_iteration = engine.state.iteration
        engine.state.metrics["knn_accuracy_at_start"] = self.at_start["knn_accuracy"]
        logger.info("at start (iteration %d): %s", engine.state.iteration, _format(self.at_start))

    def __call__(self, engine: Engine) -> None:
        figures = self.evaluate()
        engine.state.metrics.update(figures)
        logger.info(
            "epoch %d: %s; kNN accuracy %.3f at start -> %.3f now",
            engine.state.epoch, _format(figures), self.at_start.get("knn_accuracy", float("nan")), figures["knn_accuracy"],
        )


    def _at_end(self, engine: Engine) -> None:
        if "knn_accuracy" not in engine.state.metrics or engine.state.epoch % self.interval:
            self(engine)  # the last epoch was not evaluated
        start, end = self.at_start["knn_accuracy"], engine.state.metrics["knn_accuracy"]
        logger.info(
            "kNN accuracy on the labelled split: %.3f at the start of this run (iteration %d), %.3f after training "
            "(iteration %d): %s",
            start, self.at_start_iteration, end, engine.state.iteration,
            "improved" if end > start else "not improved",
        )


def _format(figures: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in figures.items())

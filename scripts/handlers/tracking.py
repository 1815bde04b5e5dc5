"""Makes MONAI's ``--tracking mlflow`` work with a trainer that keeps its batch output whole (``decollate=False``).

MONAI's default MLflow settings (``monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS``) append an ``MLFlowHandler`` to
``train#handlers`` whose iteration loss is ``monai.handlers.from_engine(['loss'], first=True)``: written for the
decollated output (a list of per-sample dicts), it returns a one-element tuple for a whole-batch dict, which
MLflow cannot log (``float() argument must be ... not 'tuple'``). The pretraining trainer keeps its output whole
(its views and embeddings are not per-sample results), so its config runs :func:`log_loss_of_whole_batch_output`
on its handlers before training; without ``--tracking`` there is no such handler and nothing changes.
The per-epoch figures of the monitors (``EmbeddingMonitor``, ``ObjectiveStats``) reach MLflow without help: they
are in ``engine.state.metrics``, which ``MLFlowHandler`` logs at every epoch end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from monai.handlers import MLFlowHandler, from_engine

__all__ = ["log_loss_of_whole_batch_output"]

_DECOLLATED_LOSS = from_engine(["loss"], first=True)


def _loss(output: Any) -> Any:
    """The ``loss`` entry of an engine output: a whole-batch dict, or a decollated list of per-sample dicts."""
    return output["loss"] if isinstance(output, Mapping) else _DECOLLATED_LOSS(output)


def log_loss_of_whole_batch_output(handlers: Iterable[Any]) -> int:
    """Gives every ``MLFlowHandler`` among ``handlers`` an iteration loss that reads whole-batch outputs too.

    Args:
        handlers: the instantiated ``train#handlers`` of a bundle config.

    Returns:
        how many MLflow handlers were adapted (0 without ``--tracking mlflow``).
    """
    adapted = 0
    for handler in handlers:
        if isinstance(handler, MLFlowHandler):
            handler.output_transform = _loss
            adapted += 1
    return adapted

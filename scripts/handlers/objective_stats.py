"""Per-epoch statistics of the pretraining objective for StatsHandler / TensorBoard."""

from __future__ import annotations

import math

from ignite.engine import Engine, Events
from torch import nn

__all__ = ["ObjectiveStats"]

# metric name -> attribute of the objective that holds its value for the last step
_STATISTICS = {
    "match_accuracy": "last_match_accuracy",
    "imle_nonzero_share": "last_gradient_nonzero_share",
    "imle_target_differs_share": "last_target_differs_share",
}


class ObjectiveStats:
    """Averages, over each epoch, the statistics an objective reports and writes them to ``engine.state.metrics``.

    ``LVMMedLoss`` reports:

    - ``match_accuracy``: share of images whose two views the (perturbed) matching paired;
    - ``imle_nonzero_share``: share of non-zero entries of the IMLE gradient (0 = no learning signal);
    - ``imle_target_differs_share``: share of IMLE target matchings that differ from the true matching
      (0 = lambda_ saturates: every target is the truth).

    An objective without these attributes (a baseline such as SimCLR) reports none of them, and the
    handler publishes nothing. Attach it before ``StatsHandler``/``TensorBoardStatsHandler``.

    Args:
        objective: the objective of the trained model.
    """

    def __init__(self, objective: nn.Module) -> None:
        self.objective = objective
        self._names = [name for name, attribute in _STATISTICS.items() if hasattr(objective, attribute)]
        self._sums = dict.fromkeys(self._names, 0.0)
        self._counts = dict.fromkeys(self._names, 0)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._publish)

    def _reset(self, engine: Engine) -> None:
        self._sums = dict.fromkeys(self._names, 0.0)
        self._counts = dict.fromkeys(self._names, 0)

    def _accumulate(self, engine: Engine) -> None:
        for name in self._names:
            value = float(getattr(self.objective, _STATISTICS[name]))
            if not math.isnan(value):  # a step without a matching (one-image batch) has no figure
                self._sums[name] += value
                self._counts[name] += 1

    def _publish(self, engine: Engine) -> None:
        engine.state.metrics.update(
            {name: self._sums[name] / self._counts[name] for name in self._names if self._counts[name]}
        )

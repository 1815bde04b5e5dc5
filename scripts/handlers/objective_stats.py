"""Per-epoch statistics of the pretraining objective for StatsHandler / TensorBoard."""

from __future__ import annotations

import math

import torch
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

    A statistic the objective holds as a tensor (``last_match_accuracy``) is summed where it lies, on the
    training device, and read once per epoch: no device-to-host synchronisation per iteration (on CUDA one
    would wait for the whole step's kernels before the next batch is prepared). A statistic given as a
    Python number is added as such (whatever synchronisation producing it took is the objective's).

    Args:
        objective: the objective of the trained model.
    """

    def __init__(self, objective: nn.Module) -> None:
        self.objective = objective
        self._names = [name for name, attribute in _STATISTICS.items() if hasattr(objective, attribute)]
        self._sums: dict[str, float | torch.Tensor] = dict.fromkeys(self._names, 0.0)
        self._counts: dict[str, int | torch.Tensor] = dict.fromkeys(self._names, 0)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._publish)

    def _reset(self, engine: Engine) -> None:
        self._sums = dict.fromkeys(self._names, 0.0)
        self._counts = dict.fromkeys(self._names, 0)

    def _accumulate(self, engine: Engine) -> None:
        # a step without a matching (one-image batch) has no figure (NaN): not counted
        for name in self._names:
            value = getattr(self.objective, _STATISTICS[name])
            if isinstance(value, torch.Tensor):
                value = value.detach().float().reshape(())
                counted = ~torch.isnan(value)
                self._sums[name] = torch.where(counted, value, 0.0) + self._sums[name]
                self._counts[name] = counted.long() + self._counts[name]
            else:
                value = float(value)
                if not math.isnan(value):
                    self._sums[name] += value
                    self._counts[name] += 1

    def _publish(self, engine: Engine) -> None:
        figures = {}
        for name in self._names:
            count = int(self._counts[name])  # the epoch's one read of a device tensor
            if count:
                figures[name] = float(self._sums[name]) / count
        engine.state.metrics.update(figures)

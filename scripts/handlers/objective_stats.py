"""Per-epoch statistics of the graph-matching objective for StatsHandler / TensorBoard."""

from __future__ import annotations

from ignite.engine import Engine, Events

from scripts.objective.lvmmed_loss import LVMMedLoss

__all__ = ["ObjectiveStats"]


class ObjectiveStats:
    """Averages, over each epoch, two figures of ``LVMMedLoss`` and writes them to ``engine.state.metrics``:

    - ``match_accuracy``: share of images whose two views the (perturbed) matching paired;
    - ``imle_nonzero_share``: share of non-zero entries of the IMLE gradient (0 = no learning signal).

    Attach it before ``StatsHandler``/``TensorBoardStatsHandler`` so they report the figures.

    Args:
        objective: the ``LVMMedLoss`` of the trained model.
    """

    def __init__(self, objective: LVMMedLoss) -> None:
        self.objective = objective
        self._sums = {"match_accuracy": 0.0, "imle_nonzero_share": 0.0}
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._publish)

    def _reset(self, engine: Engine) -> None:
        self._sums = dict.fromkeys(self._sums, 0.0)
        self._count = 0

    def _accumulate(self, engine: Engine) -> None:
        self._sums["match_accuracy"] += float(self.objective.last_match_accuracy)
        self._sums["imle_nonzero_share"] += self.objective.last_gradient_nonzero_share
        self._count += 1

    def _publish(self, engine: Engine) -> None:
        if self._count:
            engine.state.metrics.update({name: value / self._count for name, value in self._sums.items()})

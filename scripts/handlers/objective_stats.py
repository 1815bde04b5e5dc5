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
    "zero_gradient_step_share": "last_gradient_is_zero",
}
# the per-path gradient norms (a dict attribute), published as gradient_norm_<path>
_PATH_NORMS = "last_gradient_norms"


class ObjectiveStats:
    """Averages, over each epoch, the statistics an objective reports and writes them to ``engine.state.metrics``.

    ``LVMMedLoss`` reports:

    - ``match_accuracy``: share of images whose two views the (perturbed) matching paired;
    - ``imle_nonzero_share``: share of non-zero entries of the IMLE gradient (0 = no learning signal);
    - ``imle_target_differs_share``: share of IMLE target matchings that differ from the true matching
      (0 = lambda_ saturates: every target is the truth);
    - ``zero_gradient_step_share``: share of steps whose objective gradient was exactly zero in every graph;
    - ``gradient_norm_vertex``, ``gradient_norm_edge``, ``gradient_norm_local``: the norm of the gradient that
      reached the vertex embeddings through the global vertex affinity and through the edge affinities, and the
      feature maps through the local affinity (``LVMMedLoss.last_gradient_norms``), averaged over the steps on
      which they were recorded: every ``gradient_interval``-th iteration (the hooks that record them cost 8
      operator calls, so they are not on every step); and ``gradient_norm_edge_to_vertex``, the ratio of the
      epoch's edge and vertex means.

    An objective without these attributes (a baseline such as SimCLR) reports none of them, and the
    handler publishes nothing. Attach it before ``StatsHandler``/``TensorBoardStatsHandler``.

    A statistic the objective holds as a tensor (``last_match_accuracy``) is summed where it lies, on the
    training device, and read once per epoch: no device-to-host synchronisation per iteration (on CUDA one
    would wait for the whole step's kernels before the next batch is prepared). A statistic given as a
    Python number is added as such (whatever synchronisation producing it took is the objective's).

    Args:
        objective: the objective of the trained model.
        gradient_interval: record the per-path gradient norms every this many iterations (the first of each
            epoch included); None never.
    """

    def __init__(self, objective: nn.Module, gradient_interval: int | None = 10) -> None:
        if gradient_interval is not None and (isinstance(gradient_interval, bool) or gradient_interval < 1):
            raise ValueError(f"gradient_interval must be a positive integer or None, got {gradient_interval!r}.")
        self.objective = objective
        self.gradient_interval = gradient_interval if hasattr(objective, "track_gradient_paths") else None
        self._names = [name for name, attribute in _STATISTICS.items() if hasattr(objective, attribute)]
        if self.gradient_interval is not None:
            self._names += [f"gradient_norm_{path}" for path in getattr(objective, _PATH_NORMS)]
        self._sums: dict[str, float | torch.Tensor] = dict.fromkeys(self._names, 0.0)
        self._counts: dict[str, int | torch.Tensor] = dict.fromkeys(self._names, 0)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        if self.gradient_interval is not None:
            engine.add_event_handler(Events.ITERATION_STARTED, self._choose_tracking)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._publish)

    def _choose_tracking(self, engine: Engine) -> None:
        step = (engine.state.iteration - 1) % engine.state.epoch_length
        self.objective.track_gradient_paths = step % self.gradient_interval == 0

    def _reset(self, engine: Engine) -> None:
        self._sums = dict.fromkeys(self._names, 0.0)
        self._counts = dict.fromkeys(self._names, 0)

    def _accumulate(self, engine: Engine) -> None:
        # a step without a matching (one-image batch) has no figure (NaN): not counted
        values = {name: getattr(self.objective, attribute) for name, attribute in _STATISTICS.items()
                  if name in self._names}
        if self.gradient_interval is not None and self.objective.track_gradient_paths:
            values.update({f"gradient_norm_{path}": norm for path, norm in getattr(self.objective, _PATH_NORMS).items()})
        for name, value in values.items():
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
        if "gradient_norm_vertex" in figures and "gradient_norm_edge" in figures and figures["gradient_norm_vertex"] > 0:
            figures["gradient_norm_edge_to_vertex"] = figures["gradient_norm_edge"] / figures["gradient_norm_vertex"]
        engine.state.metrics.update(figures)

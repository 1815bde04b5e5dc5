"""What a run shows while it runs and when it ends: a progress bar, the loss from the first iteration, one summary line.

- :class:`ProgressBar`: Ignite's ``ProgressBar`` (tqdm) as a handler of a MONAI engine (MONAI attaches a handler
  with ``attach(engine)`` only, so the loss to show is given here), for every training and inference config's
  ``progress_bar`` option, on by default where stderr is a terminal (:func:`stderr_is_terminal`) so that logs
  written to a file or a pipe get no bar;
- :func:`log_every`: ``StatsHandler``'s ``iteration_log`` for ``log_interval``, which also logs the first
  iteration (a run shorter than ``log_interval`` iterations printed no loss at all);
- :class:`RunSummary`: one line when the engine completes: how many epochs and iterations ran, and each output
  with where it is (or that it was not written), so a run that wrote nothing says so.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as IgniteProgressBar

__all__ = ["ProgressBar", "RunSummary", "log_every", "stderr_is_terminal"]

logger = logging.getLogger(__name__)


def stderr_is_terminal() -> bool:
    """Whether stderr (where the bar is drawn) is a terminal: the ``progress_bar`` default of every config."""
    return sys.stderr.isatty()


def log_every(interval: int) -> Callable[[Engine, int], bool]:
    """``StatsHandler(iteration_log=...)`` that logs iteration 1 and every ``interval``-th iteration.

    Raises:
        ValueError: ``interval`` is not a positive integer.
    """
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"log_interval must be a positive integer, got {interval!r}.")
    return lambda engine, iteration: iteration == 1 or iteration % interval == 0


def _loss(output: Any) -> float | None:
    """The ``loss`` of a trainer's output (a whole-batch dict or a decollated list of per-sample dicts)."""
    if isinstance(output, list) and output:
        output = output[0]
    loss = output.get("loss") if isinstance(output, Mapping) else None
    return float(loss) if loss is not None else None


class ProgressBar:
    """Ignite's ``ProgressBar`` for a MONAI engine: the iterations of each epoch, with the loss for a trainer.

    Args:
        show_loss: show the output's ``loss`` (trainers); evaluators show the count only.
        persist: keep each epoch's finished bar on screen.
    """

    def __init__(self, show_loss: bool = True, persist: bool = False) -> None:
        self.show_loss = show_loss
        self.bar = IgniteProgressBar(persist=persist)

    def attach(self, engine: Engine) -> None:
        transform = (lambda output: {"loss": _loss(output)}) if self.show_loss else None
        self.bar.attach(engine, output_transform=transform)


class RunSummary:
    """Logs one line when the engine completes: what ran and, for each output, where it was written.

    Args:
        outputs: ``{what: path}`` of the run's outputs (files or folders), e.g. ``{"model": "models/model.pt"}``.
        name: what the run is, e.g. ``"training"``.
    """

    def __init__(self, outputs: Mapping[str, str | os.PathLike], name: str = "run") -> None:
        self.outputs = {what: os.fspath(path) for what, path in outputs.items()}
        self.name = name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def summary(self, engine: Engine) -> str:
        """``"training finished: 2 epoch(s), 8 iteration(s); model models/model.pt, ..."``."""
        written = [f"{what} {path}" if os.path.exists(path) else f"{what} not written ({path})"
                   for what, path in self.outputs.items()]
        return (f"{self.name} finished: {engine.state.epoch} epoch(s), {engine.state.iteration} iteration(s)"
                + ("; " + ", ".join(written) if written else ""))

    def __call__(self, engine: Engine) -> None:
        logger.info("%s", self.summary(engine))

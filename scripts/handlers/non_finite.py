"""Stopping, or skipping the step, when a training step's loss or gradients are not finite.

Without a check a NaN loss goes unnoticed: the optimizer writes NaN into every weight and the next
checkpoint holds them. This handler runs where MONAI's ``SupervisedTrainer`` fires
``IterationEvents.BACKWARD_COMPLETED``, after the backward pass and before ``optimizer.step()``, so a
bad step never reaches the weights and the checkpoints written before it stay finite.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

__all__ = ["NonFiniteError", "NonFiniteGuard", "batch_sources"]

logger = logging.getLogger(__name__)
_SOURCE_KEYS = ("source", "path", "filename_or_obj")


class NonFiniteError(RuntimeError):
    """A training step's loss or gradients are NaN or infinite; the message names the iteration and the files."""


def batch_sources(batch: Any) -> list[str]:
    """The source files of a batch, in order, without repeats: ``source``/``path``/``*_path`` entries (pretraining
    slices, classification, detection and prompt-segmentation samples), ``filename_or_obj`` of MetaTensors and of ``*_meta_dict`` entries
    (MONAI's image loaders), looked for in nested dicts and lists.
    """
    found: dict[str, None] = {}

    def add(value: Any) -> None:
        if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
            found[str(value)] = None
        elif isinstance(value, Sequence):
            for item in value:
                add(item)

    def visit(value: Any) -> None:
        if isinstance(value, MetaTensor):
            add(value.meta.get("filename_or_obj", []))
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if key in _SOURCE_KEYS or (isinstance(key, str) and key.endswith("_path")):
                    add(item)
                else:
                    visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(batch)
    return list(found)


class NonFiniteGuard:
    """Checks the loss and the gradients of every training step before the optimizer step.

    ``mode="stop"`` raises :class:`NonFiniteError` naming the iteration, the epoch and the batch's source files;
    ``mode="skip"`` drops the step (the gradients are removed, so the optimizer leaves every weight and its own
    state as they were), counts it, logs it, and reports the skipped iterations at the end of the run. Under AMP
    the gradients are scaled and an overflow is the ``GradScaler``'s business (it skips such steps itself): only
    the loss is checked, and a skipped step's gradients are set to NaN so that the scaler drops it.

    Under DDP every rank must hold this handler: the gradients are averaged across ranks, so every rank sees
    the same non-finite gradients and stops or skips at the same step.

    Args:
        mode: ``"stop"`` or ``"skip"``.
    """

    def __init__(self, mode: str = "stop") -> None:
        if mode not in ("stop", "skip"):
            raise ValueError(f"mode must be 'stop' or 'skip', got {mode!r}.")
        self.mode = mode
        self.skipped: list[int] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._report)

    def _reset(self, engine: Engine) -> None:
        self.skipped = []

    def __call__(self, engine: Engine) -> None:
        loss = engine.state.output[CommonKeys.LOSS]
        scaler = getattr(engine, "scaler", None) if getattr(engine, "amp", False) else None
        gradients = [p.grad for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        problems = []
        if not bool(torch.isfinite(loss.detach()).all()):
            problems.append(f"loss {loss.detach().flatten()[:4].tolist()}")
        if scaler is None and gradients:
            # the largest absolute value is NaN/inf exactly when some gradient is; one sync for all tensors
            largest = torch.nn.utils.get_total_norm(gradients, norm_type=math.inf)
            if not bool(torch.isfinite(largest)):
                problems.append(f"largest gradient {largest.item()}")
        if not problems:
            return
        sources = batch_sources(engine.state.batch)
        where = (f"non-finite {' and '.join(problems)} at iteration {engine.state.iteration} (epoch {engine.state.epoch}); "
                 f"batch from {', '.join(sources) if sources else 'unnamed sources'}")
        if self.mode == "stop":
            raise NonFiniteError(f"{where}. The weights were not updated; the checkpoints written so far are finite. "
                                 "Set non_finite='skip' to skip such steps.")
        self.skipped.append(engine.state.iteration)
        logger.warning("skipping the step: %s", where)
        if scaler is None:
            engine.optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are not stepped
        else:
            for gradient in gradients:
                gradient.fill_(math.nan)

    def _report(self, engine: Engine) -> None:
        if self.skipped:
            logger.warning("skipped %d steps with a non-finite loss or gradients, at iterations %s",
                           len(self.skipped), self.skipped)

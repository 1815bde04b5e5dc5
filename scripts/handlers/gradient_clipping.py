"""Gradient-norm clipping between MONAI's backward pass and the optimizer step."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

__all__ = ["GradientClipping"]


class GradientClipping:
    """Clips the global L2 norm of the trained parameters' gradients to ``max_norm`` after every backward.

    MONAI's ``SupervisedTrainer`` has no clipping option; it fires ``IterationEvents.BACKWARD_COMPLETED``
    before ``optimizer.step()``, which is where this runs. Under AMP the gradients are unscaled first.

    Args:
        max_norm: largest gradient norm (1.0 in LVM-Med's downstream training, appendix B).
    """

    def __init__(self, max_norm: float = 1.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}.")
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        parameters = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(parameters, self.max_norm)

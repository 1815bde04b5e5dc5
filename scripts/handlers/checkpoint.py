"""Atomic checkpoints of a whole training state and automatic resume from the newest one.

MONAI's ``CheckpointSaver`` writes with ``atomic=False``, so a run killed during a write can leave a
truncated file. These handlers use Ignite's ``Checkpoint`` with ``DiskSaver(atomic=True)`` (write to a
temporary file, then rename) and, at start, reload the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

__all__ = ["AtomicCheckpointSaver", "ResumeFromLatest", "latest_checkpoint"]

logger = logging.getLogger(__name__)
_PREFIX = "checkpoint"
_STEP = re.compile(rf"^{_PREFIX}_(\d+)\.pt$")


class AtomicCheckpointSaver:
    """Saves ``save_dict`` (model, optimizer, scheduler, trainer, ...) every ``interval`` iterations and at the end.

    Files are ``{save_dir}/checkpoint_{iteration}.pt``; the newest ``n_saved`` are kept. The engine the
    handler is attached to is saved too, under ``engine_key`` (so a config need not refer to its own
    trainer, which MONAI's config parser would see as a circular reference).

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects with ``state_dict``/``load_state_dict`` to save, by name.
        interval: iterations between checkpoints.
        n_saved: checkpoints kept.
        engine_key: name of the engine's state in the checkpoint; None leaves it out.
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: Mapping,
        interval: int = 100,
        n_saved: int = 2,
        engine_key: str | None = "trainer",
    ) -> None:
        if interval < 1 or n_saved < 1:
            raise ValueError(f"interval and n_saved must be positive, got {interval} and {n_saved}.")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.interval = interval
        self.n_saved = n_saved
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        if self.engine_key is not None:
            self.save_dict[self.engine_key] = engine
        checkpoint = Checkpoint(
            self.save_dict,
            DiskSaver(self.save_dir, atomic=True, require_empty=False),
            filename_prefix="",
            filename_pattern=_PREFIX + "_{global_step}.{ext}",
            n_saved=self.n_saved,
            global_step_transform=lambda engine, _: engine.state.iteration,
        )
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval) | Events.COMPLETED, checkpoint)


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The checkpoint with the highest iteration in ``save_dir`` (temporary files are ignored), or None."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return None
    steps = [(int(match.group(1)), path) for path in folder.iterdir() if (match := _STEP.match(path.name))]
    return max(steps)[1] if steps else None


class ResumeFromLatest:
    """At the start of a run, loads the newest checkpoint of ``save_dir`` into ``load_dict``, if there is one.

    The engine's state (iteration, epoch) comes back with the ``trainer`` entry of ``load_dict``, so the
    run continues where the checkpoint left it; its ``max_epochs`` stays the one of the current run.

    Args:
        save_dir: folder written by ``AtomicCheckpointSaver``.
        load_dict: the same objects, by the same names, as the saver's ``save_dict``.
        engine_key: name under which the saver stored the engine; None when it did not.
    """

    def __init__(self, save_dir: str | Path, load_dict: Mapping, engine_key: str | None = "trainer") -> None:
        self.save_dir = Path(save_dir)
        self.load_dict = dict(load_dict)
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        if self.engine_key is not None:
            self.load_dict[self.engine_key] = engine
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.save_dir)
        if path is None:
            logger.info("no checkpoint in %s: starting from scratch", self.save_dir)
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file must name itself, not surface deep in torch
            raise RuntimeError(f"cannot read checkpoint {path}: {error}") from error
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(self.load_dict, state)
        # the run's own length wins over the saved one, so a finished run can be extended
        engine.state.max_epochs = max_epochs
        logger.info("resumed from %s at iteration %d", path, engine.state.iteration)

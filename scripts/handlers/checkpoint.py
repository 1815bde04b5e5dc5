"""Atomic checkpoints of a whole training state and automatic resume from the newest one.

MONAI's ``CheckpointSaver`` writes with ``atomic=False``, so a run killed during a write can leave a
truncated file. These handlers use Ignite's ``Checkpoint`` with a save handler that writes through
``scripts.atomic_save`` (a temporary file, then a rename) and deletes the checkpoints it replaces only
after the new one is written, so a failed save (disk full) leaves the previous checkpoints intact. At
start, the newest checkpoint that loads is reloaded; a damaged one is skipped with a warning naming it.

Runs cannot mix: each checkpoint stores the identity of its run (``scripts.model_settings.run_identity`` of the
settings that define it: data, classes, image size, channels, architecture, starting encoder, ...), and a run
resumes only from a checkpoint of its own identity. Otherwise, and when the checkpoint already reached the run's
``max_epochs`` (nothing would be trained), the run stops with one line naming the folder, what differs and the
remedies (``--resume False``, another ``--output_dir``, a larger ``--max_epochs``). A run with ``resume`` off moves
the checkpoints it finds into a ``previous_run_<time>`` subfolder, so that a later resume cannot pick them up.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader

from scripts.atomic_save import write_atomically
from scripts.model_settings import differences, run_identity

__all__ = ["AtomicCheckpointSaver", "CheckpointSaveError", "ResumeFromLatest", "RunIdentity", "RunNotResumed",
           "checkpoints_newest_first", "latest_checkpoint"]

logger = logging.getLogger(__name__)
_PREFIX = "checkpoint"
_STEP = re.compile(rf"^{_PREFIX}_(\d+)\.pt$")
_RUN_KEY = "run"


class RunIdentity:
    """The settings that define a run and their digest, saved in each checkpoint under ``"run"``.

    Args:
        settings: e.g. ``scripts.model_settings.run_settings(...)`` (JSON-serialisable values).
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        self.identity = run_identity(self.settings)

    def state_dict(self) -> dict[str, Any]:
        return {"identity": self.identity, "settings": self.settings}


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the message names it and the intact ones."""


class RunNotResumed(SystemExit):
    """The run stops before training: the folder holds another run's checkpoints, or its run already reached
    ``max_epochs``. ``monai.bundle run`` prints the one-line message and exits with status 1."""


def _rank() -> int:
    # torch.distributed, not Ignite's idist: idist.get_rank() builds a new gloo group on first use, a collective
    # that hangs for good when torchrun has restarted the workers (tests/test_distributed_faults.py)
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _AtomicFiles(BaseSaveHandler):
    """Ignite save handler: each checkpoint written atomically by rank 0; the ones Ignite drops (beyond ``n_saved``,
    or the same name written again) are deleted only once the next one is on disk. Ignite's ``DiskSaver`` deletes
    them before writing, so a save failing for lack of space would lose the newest good checkpoint.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if _rank() != 0:
            return
        path = self.folder / filename
        try:
            write_atomically(path, lambda temporary: torch.save(checkpoint, temporary))
        except OSError as error:
            kept = [p.name for p in checkpoints_newest_first(self.folder)]
            raise CheckpointSaveError(error.errno, f"cannot write checkpoint {path}: {error.strerror or error}; the "
                                      f"checkpoints on disk are intact: {kept}") from error
        for name in self._pending_removal:
            if name != filename:
                (self.folder / name).unlink(missing_ok=True)
        self._pending_removal = []

    def remove(self, filename: str) -> None:
        if _rank() == 0:
            self._pending_removal.append(filename)


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
        run_settings: the settings that define the run (see :class:`RunIdentity`), saved under ``"run"`` so that
            ``ResumeFromLatest`` resumes only the same run; None saves none.
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: Mapping,
        interval: int = 100,
        n_saved: int = 2,
        engine_key: str | None = "trainer",
        run_settings: Mapping[str, Any] | None = None,
    ) -> None:
        if interval < 1 or n_saved < 1:
            raise ValueError(f"interval and n_saved must be positive, got {interval} and {n_saved}.")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        if run_settings is not None:
            self.save_dict[_RUN_KEY] = RunIdentity(run_settings)
        self.interval = interval
        self.n_saved = n_saved
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        if self.engine_key is not None:
            self.save_dict[self.engine_key] = engine
        checkpoint = Checkpoint(
            self.save_dict,
            _AtomicFiles(self.save_dir),
            filename_prefix="",
            filename_pattern=_PREFIX + "_{global_step}.{ext}",
            n_saved=self.n_saved,
            global_step_transform=lambda engine, _: engine.state.iteration,
        )
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval) | Events.COMPLETED, checkpoint)


def checkpoints_newest_first(save_dir: str | Path) -> list[Path]:
    """The checkpoints of ``save_dir``, highest iteration first (temporary files are ignored)."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return []
    steps = [(int(match.group(1)), path) for path in folder.iterdir() if (match := _STEP.match(path.name))]
    return [path for _, path in sorted(steps, reverse=True)]


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The checkpoint with the highest iteration in ``save_dir`` (temporary files are ignored), or None."""
    newest = checkpoints_newest_first(save_dir)
    return newest[0] if newest else None


class ResumeFromLatest:
    """At the start of a run, loads the newest checkpoint of ``save_dir`` into ``load_dict``, if there is one.

    A checkpoint that does not load (truncated, not a checkpoint, keys or shapes that do not fit ``load_dict``)
    is skipped with a warning naming it and the reason, and the next older one is tried; when none loads, the
    error names each file. The engine's state (iteration, epoch) comes back with the ``trainer`` entry of ``load_dict``, so the
    run continues where the checkpoint left it; its ``max_epochs`` stays the one of the current run.

    With ``run_settings``, the newest readable checkpoint must hold the same run identity (saved by
    ``AtomicCheckpointSaver`` with the same settings); otherwise the run stops (:class:`RunNotResumed`, one line
    naming the folder, what differs and the remedies) before loading anything. It also stops when the loaded checkpoint already
    reached ``max_epochs``: the run would train nothing. With ``resume`` off, the checkpoints found are moved into a
    ``previous_run_<time>`` subfolder (kept, but out of reach of a later resume) and the run starts from scratch.

    A run whose weights come from a MONAI ``CheckpointLoader`` attached to the same engine (MONAI Label's
    ``BundleTrainTask`` inserts one for ``models/model.pt`` at each train request) does not resume: restoring the
    saved engine state over those weights would end the request after 0 epochs.

    Args:
        save_dir: folder written by ``AtomicCheckpointSaver``.
        load_dict: the same objects, by the same names, as the saver's ``save_dict``.
        engine_key: name under which the saver stored the engine; None when it did not.
        run_settings: the settings of this run (the saver's); None resumes any checkpoint that loads.
        resume: False starts from scratch, moving the folder's checkpoints aside (``--resume False``).
    """

    def __init__(self, save_dir: str | Path, load_dict: Mapping, engine_key: str | None = "trainer",
                 run_settings: Mapping[str, Any] | None = None, resume: bool = True) -> None:
        if not isinstance(resume, bool):
            raise ValueError(f"resume must be True or False, got {resume!r}.")
        self.save_dir = Path(save_dir)
        self.load_dict = dict(load_dict)
        self.engine_key = engine_key
        self.run = None if run_settings is None else RunIdentity(run_settings)
        self.resume = resume

    def attach(self, engine: Engine) -> None:
        if self.engine_key is not None:
            self.load_dict[self.engine_key] = engine
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._exception_raised)

    def _exception_raised(self, engine: Engine, error: BaseException) -> None:
        """Re-raises ``RunNotResumed`` at once, so that the exception handlers attached after this one (MONAI's
        ``StatsHandler`` logs a traceback) do not bury its one-line message; other exceptions are left to those
        handlers, or re-raised when there are none (Ignite swallows an exception its handlers do not raise)."""
        handlers = [entry[0] for entry in engine._event_handlers[Events.EXCEPTION_RAISED]]
        if isinstance(error, RunNotResumed) or handlers == [self._exception_raised]:
            raise error

    def __call__(self, engine: Engine) -> None:
        # Ignite has no public listing of an event's handlers; each entry is (handler, args, kwargs)
        if any(isinstance(entry[0], CheckpointLoader) for entry in engine._event_handlers[Events.STARTED]):
            logger.info("weights loaded by a CheckpointLoader: not resuming from %s", self.save_dir)
            return
        paths = checkpoints_newest_first(self.save_dir)
        if not paths:
            logger.info("no checkpoint in %s: starting from scratch", self.save_dir)
            return
        if not self.resume:
            self._move_aside(paths)
            return
        max_epochs = engine.state.max_epochs
        failures = []
        for path in paths:
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
                if self.run is not None:
                    self._check_identity(path, checkpoint)
                # an older checkpoint loaded after a failed one overwrites every object, partial loads included
                Checkpoint.load_objects(self.load_dict, checkpoint)
            except Exception as error:  # torch and Ignite raise many types for a damaged file; each is named here
                failures.append(f"{path}: {type(error).__name__}: {error}")
                logger.warning("cannot resume from checkpoint %s (%s: %s); trying the previous one", path,
                               type(error).__name__, error)
                continue
            if engine.state.epoch >= max_epochs:
                raise RunNotResumed(
                    f"error: nothing to train: the run in {self.save_dir} already reached epoch {engine.state.epoch} "
                    f"({path.name}) of max_epochs {max_epochs}; give --max_epochs above {engine.state.epoch} to "
                    f"train on, --resume False to train again from the start, or another --output_dir")
            # the run's own length wins over the saved one, so a finished run can be extended
            engine.state.max_epochs = max_epochs
            logger.info("resumed from %s at iteration %d", path, engine.state.iteration)
            return
        raise RuntimeError(f"cannot read any checkpoint of {self.save_dir}; start afresh with --resume False (they "
                           "are moved aside), or choose another --output_dir: " + "; ".join(failures))

    def _check_identity(self, path: Path, checkpoint: Mapping) -> None:
        """Stops the run (:class:`RunNotResumed`) when ``checkpoint`` was not written by a run of this identity."""
        stored = checkpoint.get(_RUN_KEY) if isinstance(checkpoint, Mapping) else None
        if isinstance(stored, Mapping) and stored.get("identity") == self.run.identity:
            return
        if isinstance(stored, Mapping) and isinstance(stored.get("settings"), Mapping):
            what = "; ".join(differences(stored["settings"], self.run.settings)) or "its identity"
        else:
            what = "it stores no run identity (written by an earlier version of the bundle)"
        raise RunNotResumed(f"error: {self.save_dir} holds the checkpoints of another run ({path.name}), which this "
                            f"run does not resume: {what}; start this run there afresh with --resume False (the old "
                            "checkpoints are moved aside) or give it another --output_dir")

    def _move_aside(self, paths: list[Path]) -> None:
        """Moves ``paths`` into a new ``previous_run_<UTC time>`` subfolder (rank 0), where no resume looks."""
        if _rank() != 0:
            return
        archive = self.save_dir / time.strftime("previous_run_%Y%m%dT%H%M%SZ", time.gmtime())
        archive.mkdir(exist_ok=True)
        for path in paths:
            path.rename(archive / path.name)
        logger.warning("resume is off: the %d checkpoints of %s were moved to %s; this run starts from scratch",
                       len(paths), self.save_dir, archive)

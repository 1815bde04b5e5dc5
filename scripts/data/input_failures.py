"""Inference over many inputs that goes on past an unreadable one, and reports each by name and reason.

One truncated NIfTI or one ``.png`` that is no image in a folder of hundreds should not cost the masks of
all the others. The pieces, each used by every ``inference*.json``:

- :meth:`InputFailures.screen` runs a workflow's header checks item by item (``check_items`` for
  segmentation) and keeps the items that pass;
- :class:`TolerantDataset` returns a :class:`FailedInput` instead of raising when an item's reading or
  preprocessing fails, :class:`SplitFailures` (the loader's ``collate_fn``) takes those out of the batch,
  and :meth:`InputFailures.readable` (the evaluator's data) logs and records them in the main process,
  DataLoader workers included, and hands only readable batches to the engine;
- :meth:`InputFailures.finish` (the config's ``finalize``) writes ``failed_inputs.csv`` beside the outputs,
  logs one summary line ("N masks written to DIR, M failed (DIR/failed_inputs.csv)") and raises
  :class:`InputFailureError`, so that the process exits non-zero, when any input failed. When no input at all
  is readable (a single unreadable input included) the run fails at once, with the reasons.

Every run writes ``failed_inputs.csv`` (only its header when every input was read), also when it stops at once:
with no readable input, or at the first failure with ``stop_on_error=True``.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from monai.data import Dataset, list_data_collate

from scripts.atomic_save import write_atomically

__all__ = ["FailedInput", "InputFailureError", "InputFailures", "Split", "SplitFailures", "TolerantDataset", "describe"]

logger = logging.getLogger(__name__)


class InputFailureError(RuntimeError):
    """Inputs of an inference run could not be read; the message names them (all of them are in the summary)."""


@dataclass(frozen=True)
class FailedInput:
    """An input whose reading or preprocessing failed: its name (path) and why."""

    name: str
    reason: str


def describe(error: BaseException) -> str:
    """``Type: message`` of the error behind MONAI's "applying transform ..." wrappers, which say nothing of the file."""
    while error.__cause__ is not None and str(error).startswith("applying transform"):
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


class TolerantDataset(Dataset):
    """MONAI ``Dataset`` whose item is a :class:`FailedInput` when its transform raises.

    Args:
        data: the items (dicts).
        transform: reading and preprocessing.
        name_key: the item's key that names its input in reports.
    """

    def __init__(self, data: Sequence, transform: Callable | None = None, name_key: str = "image") -> None:
        super().__init__(data, transform)
        self.name_key = name_key

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as error:  # any reader or transform may fail on a bad file: each failure is reported
            item = self.data[index]
            name = item.get(self.name_key, index) if isinstance(item, Mapping) else index
            return FailedInput(str(name), describe(error))


class Split(NamedTuple):
    """A loader's batch split by :class:`SplitFailures`."""

    batch: Any  # the collated readable items, or None when none is readable
    failed: list[FailedInput]
    readable: int  # how many items the batch holds


class SplitFailures:
    """``collate_fn`` for a :class:`TolerantDataset`: a :class:`Split` of the items into readable and failed ones.

    Args:
        collate: the loader's collate function for the readable items (MONAI's ``list_data_collate`` by default;
            ``monai.data.utils.no_collation`` for detection).
    """

    def __init__(self, collate: Callable[[list], Any] = list_data_collate) -> None:
        self.collate = collate

    def __call__(self, items: list) -> Split:
        failed = [item for item in items if isinstance(item, FailedInput)]
        readable = [item for item in items if not isinstance(item, FailedInput)]
        return Split(self.collate(readable) if readable else None, failed, len(readable))


def _listing(failed: Sequence[FailedInput]) -> str:
    return "; ".join(f"{item.name} ({item.reason})" for item in failed)


class _ReadableBatches:
    """The readable batches of a loader collating with :class:`SplitFailures`; failures go to ``failures``.
    It has no length, so MONAI's engines learn the epoch's length when the loader is exhausted."""

    def __init__(self, loader: Iterable, failures: InputFailures) -> None:
        self.loader = loader
        self.failures = failures

    def __iter__(self) -> Iterator[Any]:
        readable, failed_here = 0, []
        for split in self.loader:
            for item in split.failed:
                self.failures.record(item.name, item.reason)
            failed_here += split.failed
            if split.batch is not None:
                readable += split.readable
                self.failures.processed += split.readable
                yield split.batch
        if failed_here and not readable:  # nothing to run on: the run fails now, with the reasons
            self.failures.write_summary()
            raise InputFailureError(f"none of the inputs could be read: {_listing(failed_here)} (listed in "
                                    f"{self.failures.summary_path})")


class InputFailures:
    """The inputs of an inference run that could not be read, logged as they happen and summarised at the end.

    Args:
        summary_path: the CSV of the failed inputs (columns ``input``, ``reason``), written by every run.
        stop_on_error: raise at the first failure instead of going on.
        outputs: what the run writes per input, for the summary line (e.g. ``"masks"``).
        written_to: where it writes them (a folder or a file), for the summary line; by default the folder of
            ``summary_path``.
    """

    def __init__(self, summary_path: str | Path, stop_on_error: bool = False, outputs: str = "results",
                 written_to: str | Path | None = None) -> None:
        if not isinstance(stop_on_error, bool):
            raise TypeError(f"stop_on_error must be a bool, got {stop_on_error!r}.")
        self.summary_path = Path(summary_path)
        self.stop_on_error = stop_on_error
        self.outputs = outputs
        self.written_to = Path(written_to) if written_to is not None else self.summary_path.parent
        self.failed: list[FailedInput] = []
        self.processed = 0  # inputs read and handed to the engine

    def record(self, name: str, reason: str) -> None:
        """Logs the failure of input ``name`` and keeps it for the summary; raises when ``stop_on_error``."""
        self.failed.append(FailedInput(name, reason))
        if self.stop_on_error:
            self.write_summary()
            raise InputFailureError(f"cannot read input {name}: {reason} (stop_on_error=True; listed in "
                                    f"{self.summary_path})")
        logger.error("cannot read input %s: %s; going on with the other inputs", name, reason)

    def screen(self, items: Sequence[Mapping], check: Callable[..., list], name_key: str = "image",
               **check_options: Any) -> list:
        """The items that pass ``check([item], **check_options)``, one at a time; each failing one is recorded.

        Raises:
            InputFailureError: no item passes (there is nothing to run on), after writing the summary CSV; its
                message names each item and reason (a single input's is its check's message).
        """
        passed, failures = [], []
        for item in items:
            try:
                passed.extend(check([item], **check_options))
            except Exception as error:  # the workflow's own check decides what is unreadable; each is reported
                failures.append((item, error))
        for item, error in failures:
            self.record(str(item.get(name_key, item)), describe(error))
        if failures and not passed:
            self.write_summary()
            if len(failures) == 1:
                raise InputFailureError(f"{describe(failures[0][1])} (listed in {self.summary_path})") from failures[0][1]
            raise InputFailureError(f"none of the inputs could be read: {_listing(self.failed)} (listed in "
                                    f"{self.summary_path})")
        return passed

    def readable(self, loader: Iterable) -> _ReadableBatches:
        """The evaluator's data: the batches of ``loader`` (collating with :class:`SplitFailures`) with their
        failed inputs recorded and taken out."""
        return _ReadableBatches(loader, self)

    def write_summary(self) -> None:
        """Writes the CSV of the failed inputs so far (its header only when none failed), replacing an earlier run's."""
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["input", "reason"])
        writer.writerows([item.name, item.reason] for item in self.failed)
        self.summary_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.summary_path, lambda temporary: temporary.write_text(text.getvalue()))

    def summary(self) -> str:
        """The run's one-line summary, e.g. ``"12 masks written to runs/inference, 1 failed (runs/inference/failed_inputs.csv)"``."""
        return (f"{self.processed} {self.outputs} written to {self.written_to}, {len(self.failed)} failed "
                f"({self.summary_path})")

    def finish(self) -> None:
        """Writes the summary CSV, logs :meth:`summary`, and raises :class:`InputFailureError` naming the failed
        inputs, if any failed."""
        self.write_summary()
        logger.info("%s", self.summary())
        if not self.failed:
            return
        raise InputFailureError(f"{len(self.failed)} input(s) could not be read and have no output (listed in "
                                f"{self.summary_path}; the other inputs were processed): {_listing(self.failed)}")

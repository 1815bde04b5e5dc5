"""Inference over many inputs that goes on past an unreadable one, and reports each by name and reason.

One truncated NIfTI or one ``.png`` that is no image in a folder of hundreds should not cost the masks of
all the others. The pieces, each used by every ``inference*.json``:

- :meth:`InputFailures.screen` runs a workflow's header checks item by item (``check_items`` for
  segmentation) and keeps the items that pass;
- :class:`TolerantDataset` returns a :class:`FailedInput` instead of raising when an item's reading or
  preprocessing fails, :class:`SplitFailures` (the loader's ``collate_fn``) takes those out of the batch,
  and :meth:`InputFailures.readable` (the evaluator's data) logs and records them in the main process,
  DataLoader workers included, and hands only readable batches to the engine;
- :meth:`InputFailures.finish` (the config's ``finalize``) writes ``failed_inputs.csv`` beside the outputs
  and raises :class:`InputFailureError`, so that the process exits non-zero, when any input failed. When no
  input at all is readable the run fails at once, with the reasons.

With ``stop_on_error=True`` the first failure raises at once, naming the input.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.data import Dataset, list_data_collate

from scripts.atomic_save import write_atomically

__all__ = ["FailedInput", "InputFailureError", "InputFailures", "SplitFailures", "TolerantDataset", "describe"]

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


class SplitFailures:
    """``collate_fn`` for a :class:`TolerantDataset`: ``(collated readable items or None, [FailedInput, ...])``.

    Args:
        collate: the loader's collate function for the readable items (MONAI's ``list_data_collate`` by default;
            ``monai.data.utils.no_collation`` for detection).
    """

    def __init__(self, collate: Callable[[list], Any] = list_data_collate) -> None:
        self.collate = collate

    def __call__(self, items: list) -> tuple[Any, list[FailedInput]]:
        failed = [item for item in items if isinstance(item, FailedInput)]
        readable = [item for item in items if not isinstance(item, FailedInput)]
        return (self.collate(readable) if readable else None), failed


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
        for batch, failed in self.loader:
            for item in failed:
                self.failures.record(item.name, item.reason)
            failed_here += failed
            if batch is not None:
                readable += 1
                yield batch
        if failed_here and not readable:  # nothing to run on: the run fails now, with the reasons
            raise InputFailureError(f"none of the inputs could be read: {_listing(failed_here)}")


class InputFailures:
    """The inputs of an inference run that could not be read, logged as they happen and summarised at the end.

    Args:
        summary_path: CSV written by :meth:`finish` when an input failed (columns ``input``, ``reason``).
        stop_on_error: raise at the first failure instead of going on.
    """

    def __init__(self, summary_path: str | Path, stop_on_error: bool = False) -> None:
        if not isinstance(stop_on_error, bool):
            raise TypeError(f"stop_on_error must be a bool, got {stop_on_error!r}.")
        self.summary_path = Path(summary_path)
        self.stop_on_error = stop_on_error
        self.failed: list[FailedInput] = []

    def record(self, name: str, reason: str) -> None:
        """Logs the failure of input ``name`` and keeps it for the summary; raises when ``stop_on_error``."""
        self.failed.append(FailedInput(name, reason))
        if self.stop_on_error:
            raise InputFailureError(f"cannot read input {name}: {reason} (stop_on_error=True)")
        logger.error("cannot read input %s: %s; going on with the other inputs", name, reason)

    def screen(self, items: Sequence[Mapping], check: Callable[..., list], name_key: str = "image",
               **check_options: Any) -> list:
        """The items that pass ``check([item], **check_options)``, one at a time; each failing one is recorded.

        Raises:
            the first item's error, unchanged, when no item passes (there is nothing to run on).
        """
        passed, failures = [], []
        for item in items:
            try:
                passed.extend(check([item], **check_options))
            except Exception as error:  # the workflow's own check decides what is unreadable; each is reported
                failures.append((item, error))
        if failures and not passed:
            raise failures[0][1]
        for item, error in failures:
            self.record(str(item.get(name_key, item)), describe(error))
        return passed

    def readable(self, loader: Iterable) -> _ReadableBatches:
        """The evaluator's data: the batches of ``loader`` (collating with :class:`SplitFailures`) with their
        failed inputs recorded and taken out."""
        return _ReadableBatches(loader, self)

    def finish(self) -> None:
        """Writes the summary CSV and raises :class:`InputFailureError` naming the failed inputs, if any failed;
        otherwise removes a summary left by an earlier run."""
        if not self.failed:
            self.summary_path.unlink(missing_ok=True)
            return
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["input", "reason"])
        writer.writerows([item.name, item.reason] for item in self.failed)
        write_atomically(self.summary_path, lambda temporary: temporary.write_text(text.getvalue()))
        raise InputFailureError(f"{len(self.failed)} input(s) could not be read and have no output (listed in "
                                f"{self.summary_path}; the other inputs were processed): {_listing(self.failed)}")

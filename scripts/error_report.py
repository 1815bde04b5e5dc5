"""The root cause of a failed run first, on one line, instead of MONAI's 50-70 line chain of wrappers.

A bundle run (``python -m monai.bundle run --config_file configs/X.json``) evaluates every config expression
inside ``ConfigExpression.evaluate``, which re-raises whatever the bundle's code raised as ``RuntimeError: Failed
to evaluate ConfigExpression ...``; MONAI's transforms wrap again (``applying transform ...``). Python then
prints the whole chain, and the line that names the bad file or key is 10-24 lines up. MONAI's CLI (``fire``)
leaves uncaught errors to the interpreter, so :func:`install` (called when the package ``scripts`` is imported,
which every config does first) replaces ``sys.excepthook``:

- the first line printed is the root cause, ``Type: message`` (see :func:`root_cause`);
- an error of bad input (a ``ValueError`` or ``OSError``, or an error type of the bundle's own) is then followed by
  one line saying how to see the traceback (environment variable ``LVMMED_DEBUG=1``), not by the traceback;
- any other error (a bug), or any error with ``LVMMED_DEBUG=1``, is followed by the full traceback as Python prints
  it. ``KeyboardInterrupt`` and ``SystemExit`` keep Python's own handling.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from types import TracebackType

__all__ = ["DEBUG_VARIABLE", "format_report", "install", "is_input_error", "root_cause"]

DEBUG_VARIABLE = "LVMMED_DEBUG"
_BUNDLE_CODE = Path(__file__).resolve().parent  # scripts/


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors behind it (``raise ... from``, then the one being handled), outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ if current.__cause__ is not None else (
            None if current.__suppress_context__ else current.__context__)
    return chain


def _raised_by_the_bundle(error: BaseException) -> bool:
    """Whether the bundle's code raised ``error``: its type is defined in ``scripts`` or the innermost frame of its
    traceback is a file under ``scripts/``."""
    if type(error).__module__.split(".")[0] == "scripts":
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_BUNDLE_CODE)


def root_cause(error: BaseException) -> BaseException:
    """The error that says what went wrong: walking from ``error`` to the errors behind it, the first one that the
    bundle's own code raised (its messages name the file or key; a bundle error wrapping another adds what it was
    doing), else the innermost error of the chain (MONAI's wrappers are outer ones)."""
    chain = _chain(error)
    return next((e for e in chain if _raised_by_the_bundle(e)), chain[-1])


def is_input_error(error: BaseException) -> bool:
    """Whether ``error`` reports bad input (a value, file or key given to the run) rather than a bug."""
    return isinstance(error, (ValueError, OSError)) or type(error).__module__.split(".")[0] == "scripts"


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split())  # multi-line messages (e.g. MONAI's pretty-printed expressions) on one line
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def format_report(error: BaseException, debug: bool = False) -> str:
    """What the hook prints for ``error``: the root cause on the first line, then either a hint to the traceback
    (an input error without ``debug``) or the full traceback."""
    cause = root_cause(error)
    lines = [_one_line(cause)]
    if is_input_error(cause) and not debug:
        lines.append(f"(the full traceback: set {DEBUG_VARIABLE}=1 and run the command again)")
    else:
        lines.append("".join(traceback.format_exception(error)).rstrip())
    return "\n".join(lines) + "\n"


def _hook(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    if issubclass(kind, (KeyboardInterrupt, SystemExit)):
        sys.__excepthook__(kind, error, trace)
        return
    debug = os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")
    sys.stderr.write(format_report(error.with_traceback(trace), debug=debug))
    sys.stderr.flush()


def install() -> None:
    """Makes :func:`format_report` print the uncaught errors of this process; idempotent, and leaves a hook that
    another tool installed (not Python's default) in place."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _hook

"""The weights an inference or evaluation workflow reads, required before it starts.

``monai.bundle run`` on a config whose weights file is missing would end in a ``FileNotFoundError`` traceback from
deep inside a checkpoint loader. The first expression of such a config's ``run`` list calls
:func:`require_weights`, which stops the run with one line naming the file and the command that writes it. It sits in
``run``, not in ``initialize`` or in the network's definition, so that ``ConfigWorkflow(...).initialize()``,
``check_properties()``, MONAI's ``verify_net_in_out``/``ckpt_export`` and MONAI Label (which parse the config
without running it) still work on a bundle without its weights.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["require_weights"]


def require_weights(path: str | Path, produced_by: str) -> str:
    """Returns ``path`` when it is a file; otherwise exits with a message naming it and ``produced_by``.

    Args:
        path: the weights file the workflow loads, e.g. ``models/model.pt``.
        produced_by: the command that writes it, e.g. ``make model``.

    Raises:
        SystemExit: ``path`` is not a file (``monai.bundle run`` prints the message and exits with status 1,
            without a traceback).

    Example (first expression of a config's ``run`` list)::

        "$scripts.required_weights.require_weights(@checkpoint, 'make model')"
    """
    if not produced_by:
        raise ValueError(f"produced_by must name the command that writes {path}, got {produced_by!r}.")
    if Path(path).is_file():
        return str(path)
    raise SystemExit(f"error: the weights file {path} does not exist; create it with: {produced_by}")

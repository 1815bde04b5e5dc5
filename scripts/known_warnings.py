"""Third-party notices a run repeats, shown once per process.

MONAI's DICOM reader ``NvImgCodecPydicomReader`` is built by every ``LoadImage`` (training, validation, each
monitor and inference loader), and each time it logs that nvImageCodec (a CUDA decoder) is missing and warns
that its plugin did not register: one notice says it all. :func:`register` (called when the package ``scripts``
is imported) installs, once per process, a logging filter on those loggers that passes each distinct message
once, and ``"once"`` warning filters for the known warnings (Python's default shows a warning once per code
location, and these come from several). Anything not listed here is shown as usual.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["KNOWN_LOGGERS", "KNOWN_WARNINGS", "OncePerMessage", "register"]

# loggers whose messages repeat word for word at every reader or loader a run builds
KNOWN_LOGGERS = ("monai.data.nvimgcodec_pydicom_plugin",)
# (regular expression matching the start of the message, category)
KNOWN_WARNINGS = (
    (r"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register", UserWarning),
    (r"nvImageCodec is not available", UserWarning),
)


class OncePerMessage(logging.Filter):
    """Passes a record only the first time its (logger, level, message) is seen."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def register() -> None:
    """Shows each known notice once in this process; calling it again changes nothing."""
    for name in KNOWN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, OncePerMessage) for existing in logger.filters):
            logger.addFilter(OncePerMessage())
    for message, category in KNOWN_WARNINGS:
        # filterwarnings(append=False) first removes an identical filter, so the list does not grow
        warnings.filterwarnings("once", message=message, category=category)

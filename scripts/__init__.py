"""LVM-Med bundle package: every component the configs reference, imported as ``scripts.*``.

Every config imports this package first, so a run prints a failure's root cause first (``scripts.error_report``)
and shows the known third-party notices once (``scripts.known_warnings``).
"""

from scripts.error_report import install as _report_errors_briefly
from scripts.known_warnings import register as _show_known_warnings_once

_report_errors_briefly()
_show_known_warnings_once()

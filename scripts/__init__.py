"""LVM-Med bundle package: every component the configs reference, imported as ``scripts.*``."""

from scripts.error_report import install as _report_errors_briefly

_report_errors_briefly()  # every config imports this package first: a failed run prints its root cause first

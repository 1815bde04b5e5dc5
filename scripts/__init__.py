"""LVM-Med bundle package: every component the configs reference, imported as ``scripts.*``."""

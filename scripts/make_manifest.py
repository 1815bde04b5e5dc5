"""Write a dataset manifest for a folder tree: ``python -m scripts.make_manifest ROOT --output manifest.json``.

One entry per folder, format and dimension; the modality of each comes from ``--modality FOLDER=MODALITY``,
else the files' DICOM ``Modality`` tags, else the folder names (``ct``, ``mr``/``mri``, ``xray``/``cr``/``dx``,
``us``/``ultrasound``, ...), else ``other`` (rules: :mod:`scripts.data.folder_scan`). The summary prints each
entry with its modality and where the modality came from, then the files whose headers could not be read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from scripts.data.folder_scan import NOT_FOUND, ScannedDataset, modality_hint, scan_folder
from scripts.data.manifest import canonical_modality, save_manifest

__all__ = ["main", "make_manifest"]


def make_manifest(
    root: str | Path, output: str | Path, modalities: Mapping[str, str] | None = None
) -> tuple[list[ScannedDataset], list[tuple[Path, str]]]:
    """Scan ``root`` (:func:`scripts.data.folder_scan.scan_folder`), write the manifest to ``output`` (JSON or CSV
    by suffix, entry paths relative to its folder where possible) and return the entries and the files whose
    headers could not be read, with reasons.

    Args:
        root: folder to scan.
        output: manifest file.
        modalities: folder (relative to ``root``) -> modality overrides.
    """
    scanned, unreadable = scan_folder(root, modalities)
    save_manifest([item.entry for item in scanned], output)
    return scanned, unreadable


def _override(text: str) -> tuple[str, str]:
    folder, separator, modality = text.partition("=")
    if not separator or not folder:
        raise argparse.ArgumentTypeError(f"expected FOLDER=MODALITY, got {text!r}")
    try:
        return folder, canonical_modality(modality)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder tree to scan")
    parser.add_argument("--output", type=Path, default=Path("manifest.json"), help="manifest (.json or .csv)")
    parser.add_argument("--modality", "--modality-map", dest="modalities", type=_override, action="append",
                        default=[], metavar="FOLDER=MODALITY",
                        help="modality of the files in FOLDER (relative to ROOT) and below; repeatable")
    args = parser.parse_args(argv)
    try:
        scanned, unreadable = make_manifest(args.root, args.output, dict(args.modalities))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(scanned)} dataset(s) to {args.output}")
    width = max(len(item.entry.name) for item in scanned)
    for item in scanned:
        entry = item.entry
        print(f"  {entry.name:<{width}}  {entry.modality:<10}  {entry.dimension}D  {entry.format:<12}  "
              f"modality from {item.modality_source:<24}  {entry.path}")
    unknown = [item.entry.name for item in scanned if item.modality_source == NOT_FOUND]
    if unknown:
        print(f"  note: {modality_hint(unknown)}")
    for path, reason in unreadable:
        print(f"  unreadable: {path}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Index a manifest and report what it yields: ``python -m scripts.manifest_report manifest.json`` (or a folder).

Builds :class:`~scripts.data.slices.PretrainSliceDataset` (skipping bad files) from a manifest, or from a folder
scanned as ``make_manifest`` does, and prints the number of samples per modality and per dataset with where
each dataset's modality came from (``manifest``; for a folder, the DICOM Modality tag or a folder name), a note
on datasets whose modality was not found, then every skipped file with its reason.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from scripts.data.folder_scan import NOT_FOUND, modality_hint
from scripts.data.slices import PretrainSliceDataset

__all__ = ["main", "report"]


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [list(map(str, header)), *[list(map(str, row)) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    return [lines[0], "  ".join("-" * width for width in widths), *lines[1:]]


def report(dataset: PretrainSliceDataset) -> str:
    """Sample counts per modality and per dataset (entries that yield nothing included) with where each modality
    came from, a note on datasets of unknown modality, then skipped files."""
    per_modality = Counter(dataset.modalities)
    per_dataset = Counter(dataset.dataset_names)
    lines = [f"{len(dataset)} samples from {len(dataset.entries)} dataset(s); {len(dataset.skipped)} skipped", ""]
    lines += _table(("modality", "samples"), sorted(per_modality.items(), key=lambda item: (-item[1], item[0])))
    lines.append("")
    lines += _table(("dataset", "modality", "modality from", "dim", "label", "samples"),
                    [(e.name, e.modality, dataset.modality_sources[e.name], f"{e.dimension}D", e.label,
                      per_dataset[e.name]) for e in dataset.entries])
    unknown = [name for name, source in dataset.modality_sources.items() if source == NOT_FOUND]
    if unknown:
        lines += ["", f"note: {modality_hint(unknown)}"]
    if dataset.skipped:
        lines += ["", "skipped:"]
        lines += [f"  {path}: {reason}" for path, reason in dataset.skipped]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="manifest (.json or .csv), or a folder of images to scan")
    parser.add_argument("--min-foreground", type=float, default=0.0,
                        help="leave out slices with a smaller share of foreground pixels (reads all data)")
    parser.add_argument("--verify-data", action="store_true",
                        help="read every image's data, to also find corrupt data and NaN/Inf values")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    try:
        dataset = PretrainSliceDataset(args.manifest, min_foreground=args.min_foreground,
                                       verify_data=args.verify_data)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report(dataset))
    return 0


if __name__ == "__main__":
    sys.exit(main())

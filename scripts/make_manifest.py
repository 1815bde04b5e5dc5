"""Write a dataset manifest for a folder tree: ``python -m scripts.make_manifest ROOT --output manifest.json``.

Image files are grouped by the folder that holds them; the files of one folder, format and dimension become
one dataset entry whose path is the glob ``FOLDER/*`` restricted by the entry's ``format`` (so entries never
overlap; see :mod:`scripts.data.sources`). Should one folder hold files of one format but different
dimensions, each of them gets an entry of its own. Dimension and format come from the files:

- PNG/JPEG: 2D; NIfTI: 3D, or 2D when the header's shape is 2D (or its third dimension is 1);
- DICOM: a folder in which a series has several files, or a multi-frame file, becomes a 3D ``dicom-series``
  entry; otherwise a 2D ``dicom`` entry.

The modality of an entry comes from ``--modality FOLDER=MODALITY`` (FOLDER relative to ROOT; it covers its
sub-folders, the deepest override wins), else from the most common DICOM ``Modality`` tag of its files
(:data:`DICOM_MODALITIES`), else ``other``. Files whose headers cannot be read still belong to their entry
(building the index reports them); they are listed in the summary.
"""

from __future__ import annotations

import argparse
import glob
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from scripts.data.manifest import SourceDataset, canonical_modality, save_manifest
from scripts.data.readers import ImageReadError, detect_format, read_header

__all__ = ["DICOM_MODALITIES", "main", "make_manifest"]

DICOM_MODALITIES = {
    "CT": "CT", "MR": "MRI", "PT": "PET", "US": "ultrasound", "IVUS": "ultrasound",
    "CR": "X-ray", "DX": "X-ray", "MG": "X-ray", "RF": "X-ray", "XA": "X-ray", "IO": "X-ray", "PX": "X-ray",
    "OP": "fundus", "OPT": "OCT", "ES": "endoscopy", "XC": "colour",
}


@dataclass(frozen=True)
class _File:
    path: Path
    format: str
    dimension: int | None = None  # None: decided by the folder (DICOM) or unknown (unreadable NIfTI)
    modality_tag: str | None = None
    series: str | None = None
    frames: int = 1


def _describe(path: Path, fmt: str, unreadable: list[tuple[Path, str]]) -> _File:
    """What the file's header says about its dimension, DICOM modality and series."""
    if fmt in ("png", "jpeg"):
        return _File(path, fmt, 2)
    if fmt == "nifti":
        try:
            shape = read_header(path, "nifti").shape
        except ImageReadError as error:
            unreadable.append((path, error.reason))
            return _File(path, fmt)
        return _File(path, fmt, 2 if len(shape) == 2 or shape[2] == 1 else 3)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is only reported here
        unreadable.append((path, f"not a readable DICOM file ({type(error).__name__}: {error})"))
        return _File(path, fmt)
    return _File(path, fmt, None, str(ds.get("Modality") or "") or None, ds.get("SeriesInstanceUID"),
                 int(ds.get("NumberOfFrames") or 1))


def _modality(folder: Path, files: Sequence[_File], overrides: Mapping[Path, str]) -> str:
    matching = [prefix for prefix in overrides if folder == prefix or prefix in folder.parents]
    if matching:
        return overrides[max(matching, key=lambda prefix: len(prefix.parts))]
    tags = Counter(DICOM_MODALITIES.get(f.modality_tag or "", "other") for f in files if f.modality_tag)
    return tags.most_common(1)[0][0] if tags else "other"


def _folder_entries(
    folder: Path, root: Path, files: Sequence[_File], overrides: Mapping[Path, str]
) -> list[SourceDataset]:
    base = folder.relative_to(root).as_posix()
    base = root.name if base == "." else base
    groups: dict[str, list[_File]] = {}
    for file in files:
        groups.setdefault(file.format, []).append(file)
    entries = []
    for fmt, members in groups.items():
        name = base if len(groups) == 1 else f"{base}:{fmt}"
        modality = _modality(folder, members, overrides)
        pattern = Path(glob.escape(str(folder))) / "*"
        if fmt == "dicom":
            per_series = Counter(f.series for f in members if f.series is not None)
            volume = any(count > 1 for count in per_series.values()) or any(f.frames > 1 for f in members)
            entries.append(SourceDataset(name, pattern, modality, 3 if volume else 2,
                                         format="dicom-series" if volume else "dicom"))
            continue
        dimensions = {f.dimension or 3 for f in members}
        if len(dimensions) == 1:
            entries.append(SourceDataset(name, pattern, modality, dimensions.pop(), format=fmt))
        else:
            entries.extend(SourceDataset(f"{name}/{f.path.name}", f.path, modality, f.dimension or 3, format=fmt)
                           for f in members)
    return entries


def make_manifest(
    root: str | Path, output: str | Path, modalities: Mapping[str, str] | None = None
) -> tuple[list[SourceDataset], list[tuple[Path, str]]]:
    """Scan ``root``, write the manifest to ``output`` (JSON or CSV by suffix) and return its entries and the
    files whose headers could not be read, with reasons.

    Args:
        root: folder to scan (hidden files and folders are passed over).
        output: manifest file; entry paths are written relative to its folder where possible.
        modalities: folder (relative to ``root``) -> modality overrides.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    overrides = {(root / folder).resolve(): canonical_modality(modality)
                 for folder, modality in (modalities or {}).items()}
    unreadable: list[tuple[Path, str]] = []
    entries: list[SourceDataset] = []
    folders = [root, *sorted(p for p in root.rglob("*") if p.is_dir()
                             and not any(part.startswith(".") for part in p.relative_to(root).parts))]
    for folder in folders:
        files = []
        for path in sorted(folder.iterdir()):
            fmt = detect_format(path) if path.is_file() and not path.name.startswith(".") else None
            if fmt is not None and path.name.upper() != "DICOMDIR":
                files.append(_describe(path, fmt, unreadable))
        if files:
            entries.extend(_folder_entries(folder, root, files, overrides))
    if not entries:
        raise ValueError(f"{root}: no image files (.png, .jpg, .nii, .nii.gz, DICOM) found")
    save_manifest(entries, output)
    return entries, unreadable


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
        entries, unreadable = make_manifest(args.root, args.output, dict(args.modalities))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(entries)} dataset(s) to {args.output}")
    width = max(len(entry.name) for entry in entries)
    for entry in entries:
        print(f"  {entry.name:<{width}}  {entry.modality:<10}  {entry.dimension}D  {entry.format:<12}  {entry.path}")
    for path, reason in unreadable:
        print(f"  unreadable: {path}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

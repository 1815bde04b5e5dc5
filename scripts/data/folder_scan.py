"""Manifest entries for a folder tree, with the modality of each found from the files or the folder names.

Image files are grouped by the folder that holds them; the files of one folder, format and dimension become
one dataset entry whose path is the glob ``FOLDER/*`` restricted by the entry's ``format`` (so entries never
overlap; see :mod:`scripts.data.sources`). Should one folder hold files of one format but different
dimensions, each of them gets an entry of its own. Dimension and format come from the files:

- PNG/JPEG: 2D; NIfTI: 3D, or 2D when the header's shape is 2D (or its third dimension is 1);
- DICOM: a folder in which a series has several files, or a multi-frame file (a cine loop), becomes a 3D
  ``dicom-series`` entry; otherwise a 2D ``dicom`` entry.

The modality of an entry comes, first match wins, from

1. an override ``FOLDER -> MODALITY`` (FOLDER relative to the root; it covers its sub-folders, the deepest
   override wins);
2. the most common DICOM ``Modality`` tag of its files that :data:`DICOM_MODALITIES` knows (CT, MR, CR/DX/DR,
   US, ...);
3. the name of its folder or of a folder above it up to the root's own name, the deepest that names a
   modality (:data:`FOLDER_MODALITIES`: ``ct``, ``mr``/``mri``, ``xray``/``x-ray``/``cr``/``dx``,
   ``us``/``ultrasound``, ...; a whole name or one of its words separated by ``_``, ``-``, ``.`` or spaces,
   so ``brain_mri`` and ``chest-xray`` count, ``mristudy`` does not);
4. else ``other``.

Each entry's :attr:`ScannedDataset.modality_source` says which rule gave it. Files whose headers cannot be read
still belong to their entry (building the index reports them); they are returned with their reasons.
Nothing is written anywhere.
"""

from __future__ import annotations

import glob
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from scripts.data.manifest import SourceDataset, canonical_modality
from scripts.data.readers import ImageReadError, detect_format, read_header

__all__ = [
    "DICOM_MODALITIES", "FOLDER_MODALITIES", "NOT_FOUND", "ScannedDataset", "folder_modality", "modality_hint",
    "scan_folder",
]

DICOM_MODALITIES = {
    "CT": "CT", "MR": "MRI", "PT": "PET", "US": "ultrasound", "IVUS": "ultrasound",
    "CR": "X-ray", "DX": "X-ray", "DR": "X-ray", "MG": "X-ray", "RF": "X-ray", "XA": "X-ray", "IO": "X-ray",
    "PX": "X-ray", "OP": "fundus", "OPT": "OCT", "ES": "endoscopy", "XC": "colour",
}
# lower-case folder names (or words of them) -> modality; besides these, each modality's own name counts
FOLDER_MODALITIES = {
    "ct": "CT", "cta": "CT", "mr": "MRI", "mri": "MRI", "xray": "X-ray", "x-ray": "X-ray", "xrays": "X-ray",
    "x-rays": "X-ray", "cr": "X-ray", "dx": "X-ray", "radiograph": "X-ray", "radiographs": "X-ray",
    "radiography": "X-ray", "cxr": "X-ray", "mammography": "X-ray", "mammo": "X-ray", "us": "ultrasound",
    "ultrasound": "ultrasound", "sonography": "ultrasound", "echo": "ultrasound", "pet": "PET", "oct": "OCT",
    "endoscopy": "endoscopy", "colonoscopy": "endoscopy", "dermoscopy": "dermoscopy", "dermatoscopy": "dermoscopy",
    "fundus": "fundus",
}
NOT_FOUND = "none found"  # the modality_source of an entry left as "other"
_WORD_SEPARATORS = re.compile(r"[_.\s]+|-(?!rays?$)")  # "x-ray" stays one word


@dataclass(frozen=True)
class ScannedDataset:
    """A manifest entry found by :func:`scan_folder` and how its modality was found (``modality_source``,
    e.g. ``"DICOM Modality MR"``, ``"folder name 'mri'"``, ``"--modality"`` or ``"none found"``)."""

    entry: SourceDataset
    modality_source: str


@dataclass(frozen=True)
class _File:
    path: Path
    format: str
    dimension: int | None = None  # None: decided by the folder (DICOM) or unknown (unreadable NIfTI)
    modality_tag: str | None = None
    series: str | None = None
    frames: int = 1


def folder_modality(name: str) -> str | None:
    """The modality a folder name gives (:data:`FOLDER_MODALITIES` or a modality's own name, for the whole
    name or one of its words), or None."""
    key = name.strip().lower()
    for candidate in (key, *_WORD_SEPARATORS.split(key)):
        if candidate in FOLDER_MODALITIES:
            return FOLDER_MODALITIES[candidate]
        try:
            return canonical_modality(candidate) if candidate != "other" else None
        except ValueError:
            continue
    return None


def modality_hint(names: Sequence[str]) -> str:
    """The advice given for datasets whose modality was not found (modality balancing lumps them together)."""
    return (f"modality not found for {len(names)} dataset(s) ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}): modality balancing lumps them together as 'other'; name their "
            "folders by modality (ct, mr, xray, us, ...) or write a manifest with "
            "python -m scripts.make_manifest ROOT --modality FOLDER=MODALITY")


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


def _modality(folder: Path, root: Path, files: Sequence[_File], overrides: Mapping[Path, str]) -> tuple[str, str]:
    """(modality, how it was found) by the rules of the module docstring."""
    matching = [prefix for prefix in overrides if folder == prefix or prefix in folder.parents]
    if matching:
        return overrides[max(matching, key=lambda prefix: len(prefix.parts))], "--modality"
    tags = Counter(f.modality_tag for f in files if f.modality_tag in DICOM_MODALITIES)
    if tags:
        tag = tags.most_common(1)[0][0]
        return DICOM_MODALITIES[tag], f"DICOM Modality {tag}"
    names = [root.name, *folder.relative_to(root).parts]
    for name in reversed(names):
        modality = folder_modality(name)
        if modality is not None:
            return modality, f"folder name {name!r}"
    return "other", NOT_FOUND


def _folder_entries(
    folder: Path, root: Path, files: Sequence[_File], overrides: Mapping[Path, str]
) -> list[ScannedDataset]:
    base = folder.relative_to(root).as_posix()
    base = root.name if base == "." else base
    groups: dict[str, list[_File]] = {}
    for file in files:
        groups.setdefault(file.format, []).append(file)
    entries = []
    for fmt, members in groups.items():
        name = base if len(groups) == 1 else f"{base}:{fmt}"
        modality, source = _modality(folder, root, members, overrides)
        pattern = Path(glob.escape(str(folder))) / "*"
        if fmt == "dicom":
            per_series = Counter(f.series for f in members if f.series is not None)
            volume = any(count > 1 for count in per_series.values()) or any(f.frames > 1 for f in members)
            entries.append(ScannedDataset(SourceDataset(name, pattern, modality, 3 if volume else 2,
                                                        format="dicom-series" if volume else "dicom"), source))
            continue
        dimensions = {f.dimension or 3 for f in members}
        if len(dimensions) == 1:
            entries.append(ScannedDataset(SourceDataset(name, pattern, modality, dimensions.pop(), format=fmt),
                                          source))
        else:
            entries.extend(ScannedDataset(SourceDataset(f"{name}/{f.path.name}", f.path, modality, f.dimension or 3,
                                                        format=fmt), source) for f in members)
    return entries


def scan_folder(
    root: str | Path, modalities: Mapping[str, str] | None = None
) -> tuple[list[ScannedDataset], list[tuple[Path, str]]]:
    """The manifest entries of the images below ``root`` and the files whose headers could not be read.

    Args:
        root: folder to scan (hidden files and folders, and DICOMDIR files, are passed over).
        modalities: folder (relative to ``root``) -> modality overrides.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: an override names an unknown modality, or ``root`` holds no image file.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    overrides = {(root / folder).resolve(): canonical_modality(modality)
                 for folder, modality in (modalities or {}).items()}
    unreadable: list[tuple[Path, str]] = []
    entries: list[ScannedDataset] = []
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
    return entries, unreadable

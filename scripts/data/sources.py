"""Expansion of a manifest entry's ``path`` (a file, a folder or a glob) into the images it names.

- A file is one image; its format must be recognisable (or given by the entry's ``format``).
- A folder stands for every image file below it (recursively).
- A glob stands for the files it matches; folders it matches are passed over, so ``scans/*`` means the files
  directly in ``scans`` and ``patients/*/ct/**`` every file below each ``ct`` folder.
- Hidden files and folders, ``DICOMDIR`` files and files of no known format are ignored; with a ``format``
  only files of that format are kept.
- DICOM files become one image each (format ``dicom``: 2D, or 3D for multi-frame files), or one volume per
  SeriesInstanceUID (format ``dicom-series``; a multi-frame file, such as a cine loop, is a volume of its own,
  named by its file); without a ``format``, 3D entries group DICOM files into series.

A path that matches nothing raises :class:`~scripts.data.readers.ImageReadError` naming it; problems of the
individual images are left to :func:`~scripts.data.readers.read_header`.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from scripts.data.manifest import SourceDataset
from scripts.data.readers import ImageReadError, ImageSource, detect_format, group_dicom_series

__all__ = ["expand_entry"]


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.upper() == "DICOMDIR"


def _files_below(folder: Path) -> list[Path]:
    files = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        files.extend(Path(directory) / name for name in sorted(names) if not _ignored(name))
    return files


def _named_files(path: Path) -> tuple[list[Path], bool]:
    """The files an entry's path names, and whether it names a single file."""
    if path.is_file():
        return [path], True
    if path.is_dir():
        return _files_below(path), False
    pattern = str(path)
    if glob.has_magic(pattern):
        matches = [Path(match) for match in sorted(glob.glob(pattern, recursive=True))
                   if os.path.isfile(match) and not _ignored(os.path.basename(match))]
        if not matches:
            raise ImageReadError(path, "the glob matches no files")
        return matches, False
    raise ImageReadError(path, "no such file or folder")


def expand_entry(entry: SourceDataset) -> list[ImageSource]:
    """The images of a manifest entry, in a deterministic order.

    Raises:
        ImageReadError: the path does not exist, the glob matches nothing, a file named on its own has an
            unrecognised format, or no image file of the wanted format was found.
    """
    named, single = _named_files(entry.path)
    wanted = "dicom" if entry.format == "dicom-series" else entry.format
    if single:
        fmt = wanted or detect_format(named[0])
        if fmt is None:
            raise ImageReadError(named[0], "unrecognised image format (expected .png, .jpg, .nii, .nii.gz or "
                                           "DICOM); set the entry's format if the name misleads")
        files = {named[0]: fmt}
    else:
        formats = {file: detect_format(file) for file in named}
        files = {file: fmt for file, fmt in formats.items() if fmt is not None and wanted in (None, fmt)}
    if not files:
        kind = f"{entry.format} " if entry.format else ""
        raise ImageReadError(entry.path, f"no {kind}image files found (dataset {entry.name!r})")

    as_series = entry.format == "dicom-series" or (entry.format is None and entry.dimension == 3)
    sources = [ImageSource(file, fmt) for file, fmt in files.items() if not (fmt == "dicom" and as_series)]
    dicom_files = [file for file, fmt in files.items() if fmt == "dicom" and as_series]
    for series in group_dicom_series(dicom_files):
        # a series of one file (a multi-frame cine loop, say) is named by its file, so loops sharing a folder differ
        where = series[0] if len(series) == 1 else Path(os.path.commonpath([file.parent for file in series]))
        sources.append(ImageSource(where, "dicom-series", series))
    return sources

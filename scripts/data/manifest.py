"""Dataset manifest: the list of source datasets that pretraining reads, as JSON or CSV.

A JSON manifest is an object ``{"datasets": [entry, ...]}``; a CSV manifest has one entry per row and
the entry fields as columns (``name``, ``path``, ``modality`` and ``dimension`` required). Fields:

- ``name`` (str, unique): the dataset's name.
- ``path`` (str): a file, a folder (every image file below it) or a glob; relative paths are resolved
  against the manifest's folder.
- ``modality``: one of :data:`MODALITIES`, case-insensitive, stored in its canonical spelling.
- ``dimension``: 2 (each file is one image) or 3 (each file or DICOM series is a volume, cut into slices).
- ``slice_axis`` (3D only): the array axis the volume is sliced along, 0, 1 or 2; default 2.
- ``label`` (str): a class name for monitors (kNN probes); default the modality.
- ``window`` ([low, high]): fixed intensity window mapped to [0, 1]; default [-1000, 1000] HU for CT, none
  otherwise (see :mod:`scripts.data.intensity`).
- ``format``: one of :data:`FORMATS`; default inferred per file (a 3D entry groups DICOM files into series).

In CSV, empty cells are unset fields and ``window`` is written ``"low,high"``. Every problem (unknown key,
wrong type, unknown modality, duplicate name, unreadable file) raises a ValueError naming the manifest, the
entry and the field.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.atomic_save import write_atomically

__all__ = [
    "DEFAULT_CT_WINDOW",
    "FORMATS",
    "MODALITIES",
    "SourceDataset",
    "canonical_modality",
    "load_manifest",
    "parse_manifest",
    "save_manifest",
]

MODALITIES = (
    "CT", "MRI", "X-ray", "ultrasound", "colour", "OCT", "PET", "endoscopy", "dermoscopy", "fundus", "other",
)
FORMATS = ("png", "jpeg", "nifti", "dicom", "dicom-series")
DEFAULT_CT_WINDOW = (-1000.0, 1000.0)
FIELDS = ("name", "path", "modality", "dimension", "slice_axis", "label", "window", "format")
REQUIRED = ("name", "path", "modality", "dimension")
_MODALITY_BY_KEY = {m.lower(): m for m in MODALITIES}


def canonical_modality(value: str) -> str:
    """The canonical spelling of a modality name (case-insensitive); ValueError for an unknown one."""
    try:
        return _MODALITY_BY_KEY[value.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown modality {value!r}; expected one of {', '.join(MODALITIES)}") from None


@dataclass(frozen=True)
class SourceDataset:
    """One entry of a manifest, validated, with defaults filled in (see the module docstring)."""

    name: str
    path: Path
    modality: str
    dimension: int
    slice_axis: int | None = None
    label: str | None = None
    window: tuple[float, float] | None = None
    format: str | None = None

    def __post_init__(self) -> None:
        def fail(field: str, problem: str) -> ValueError:
            return ValueError(f"dataset {self.name!r}: field {field!r} {problem}")

        if not isinstance(self.name, str) or not self.name.strip():
            raise fail("name", "must be a non-empty string")
        if not isinstance(self.path, Path) or not str(self.path).strip():
            raise fail("path", "must be a non-empty path")
        if not isinstance(self.modality, str):
            raise fail("modality", f"must be a string, got {type(self.modality).__name__}")
        try:
            object.__setattr__(self, "modality", canonical_modality(self.modality))
        except ValueError as error:
            raise fail("modality", f"is invalid: {error}") from None
        if not _is_int(self.dimension) or self.dimension not in (2, 3):
            raise fail("dimension", f"must be 2 or 3, got {self.dimension!r}")
        if self.dimension == 2 and self.slice_axis is not None:
            raise fail("slice_axis", "applies to 3D datasets only (dimension is 2)")
        if self.dimension == 3:
            axis = 2 if self.slice_axis is None else self.slice_axis
            if not _is_int(axis) or axis not in (0, 1, 2):
                raise fail("slice_axis", f"must be 0, 1 or 2, got {self.slice_axis!r}")
            object.__setattr__(self, "slice_axis", axis)
        label = self.modality if self.label is None else self.label
        if not isinstance(label, str) or not label.strip():
            raise fail("label", "must be a non-empty string")
        object.__setattr__(self, "label", label)
        window = DEFAULT_CT_WINDOW if self.window is None and self.modality == "CT" else self.window
        if window is not None:
            window = _window(window)
            if window is None:
                raise fail("window", f"must be two finite numbers [low, high] with low < high, got {self.window!r}")
        object.__setattr__(self, "window", window)
        if self.format is not None:
            if not isinstance(self.format, str) or self.format.strip().lower() not in FORMATS:
                raise fail("format", f"must be one of {', '.join(FORMATS)}, got {self.format!r}")
            object.__setattr__(self, "format", self.format.strip().lower())

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The entry as manifest fields; ``path`` relative to ``relative_to`` when it lies below it."""
        path = self.path
        if relative_to is not None and path.is_absolute():
            try:
                path = path.relative_to(relative_to.resolve())
            except ValueError:
                pass
        entry: dict[str, Any] = {
            "name": self.name, "path": path.as_posix(), "modality": self.modality, "dimension": self.dimension,
            "slice_axis": self.slice_axis, "label": self.label,
            "window": None if self.window is None else list(self.window), "format": self.format,
        }
        return {key: value for key, value in entry.items() if value is not None}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _window(value: object) -> tuple[float, float] | None:
    """``value`` as a (low, high) pair of finite floats with low < high, or None when it is not one."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    try:
        low, high = float(value[0]), float(value[1])
    except OverflowError:
        return None
    return (low, high) if math.isfinite(low) and math.isfinite(high) and low < high else None


def _entry(raw: object, position: str, base_dir: Path) -> SourceDataset:
    """Validate one raw entry (decoded JSON, or a CSV row already typed) into a SourceDataset."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{position}: must be an object with fields {', '.join(FIELDS)}, got {type(raw).__name__}")
    name = raw.get("name")
    where = f"{position} ({name!r})" if isinstance(name, str) else position
    unknown = sorted(str(key) for key in raw if key not in FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(FIELDS)}")
    missing = [key for key in REQUIRED if raw.get(key) is None]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {', '.join(map(repr, missing))}")
    for key in ("name", "path", "modality", "label", "format"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(raw[key]).__name__}")
    for key in ("dimension", "slice_axis"):
        if raw.get(key) is not None and not _is_int(raw[key]):
            raise ValueError(f"{where}: field {key!r} must be an integer, got {raw[key]!r}")
    if not raw["path"].strip() or "\0" in raw["path"]:
        raise ValueError(f"{where}: field 'path' must be a non-empty path without NUL characters")
    path = Path(raw["path"])
    try:
        return SourceDataset(
            name=raw["name"], path=path if path.is_absolute() else base_dir / path, modality=raw["modality"],
            dimension=raw["dimension"], slice_axis=raw.get("slice_axis"), label=raw.get("label"),
            window=raw.get("window"), format=raw.get("format"),
        )
    except ValueError as error:
        raise ValueError(f"{position}: {error}") from None


def _json_entries(text: str) -> list[object]:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"not valid JSON: {error}") from None
    if not isinstance(document, dict) or set(document) != {"datasets"}:
        raise ValueError('a JSON manifest must be an object with the single key "datasets"')
    if not isinstance(document["datasets"], list):
        raise ValueError('"datasets" must be a list of entries')
    return document["datasets"]


def _csv_cell(key: str, cell: str, row: int) -> object:
    """Type one non-empty CSV cell: integers for dimension/slice_axis, two numbers for window."""
    if key in ("dimension", "slice_axis"):
        try:
            return int(cell)
        except ValueError:
            raise ValueError(f"row {row}: field {key!r} must be an integer, got {cell!r}") from None
    if key == "window":
        try:
            return [float(v) for v in cell.strip().strip("[]").split(",")]
        except ValueError:
            raise ValueError(f"row {row}: field 'window' must be 'low,high', got {cell!r}") from None
    return cell


def _csv_entries(text: str) -> list[object]:
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise ValueError(f"not valid CSV: {error}") from None
    if not rows:
        raise ValueError("the CSV manifest is empty; its first row must name the columns")
    header = [cell.strip() for cell in rows[0]]
    unknown = [key for key in header if key not in FIELDS]
    if unknown or len(set(header)) != len(header):
        raise ValueError(f"CSV header {header} must name distinct columns among {', '.join(FIELDS)}")
    entries: list[object] = []
    for number, cells in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(header):
            raise ValueError(f"row {number}: {len(cells)} cells but the header names {len(header)} columns")
        entries.append(
            {key: _csv_cell(key, cell, number) for key, cell in zip(header, cells) if cell.strip()}
        )
    return entries


def parse_manifest(text: str, kind: str, base_dir: Path | str = ".") -> list[SourceDataset]:
    """Entries of a manifest given as text; ``kind`` is ``"json"`` or ``"csv"``; relative paths against ``base_dir``.

    Raises:
        ValueError: for any problem, naming the entry (by position and name) and the field.
    """
    if kind not in ("json", "csv"):
        raise ValueError(f"manifest kind must be 'json' or 'csv', got {kind!r}")
    raw_entries = _json_entries(text) if kind == "json" else _csv_entries(text)
    base = Path(base_dir)
    entries = []
    seen: set[str] = set()
    for number, raw in enumerate(raw_entries, start=1):
        position = f"entry {number}" if kind == "json" else f"row {number + 1}"
        entry = _entry(raw, position, base)
        if entry.name in seen:
            raise ValueError(f"{position}: field 'name' duplicates the dataset name {entry.name!r}")
        seen.add(entry.name)
        entries.append(entry)
    return entries


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise ValueError(f"manifest {path}: the file name must end in .json or .csv")
    return suffix[1:]


def load_manifest(path: str | Path) -> list[SourceDataset]:
    """Read and validate a JSON or CSV manifest (by suffix); relative paths are resolved against its folder.

    Raises:
        FileNotFoundError: the manifest does not exist.
        ValueError: the manifest is malformed; the message names the file, the entry and the field.
    """
    path = Path(path)
    kind = _kind(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"manifest {path}: not UTF-8 text ({error})") from None
    try:
        return parse_manifest(text, kind, path.resolve().parent)
    except ValueError as error:
        raise ValueError(f"manifest {path}: {error}") from None


def save_manifest(entries: Sequence[SourceDataset], path: str | Path) -> Path:
    """Write entries as a JSON or CSV manifest (by suffix), paths relative to its folder where possible.

    The file is written to a temporary name and renamed, so an interrupted write never leaves half a manifest.
    """
    path = Path(path)
    kind = _kind(path)
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"manifest {path}: dataset names must be unique, got {names}")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [entry.to_dict(relative_to=path.parent) for entry in entries]
    if kind == "json":
        text = json.dumps({"datasets": rows}, indent=2) + "\n"
    else:
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            if "window" in row:
                row["window"] = ",".join(repr(v) for v in row["window"])
            writer.writerow(row)
        text = buffer.getvalue()
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))

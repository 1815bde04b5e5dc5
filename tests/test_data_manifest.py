"""Tests for the dataset manifest (scripts/data/manifest.py): parsing, validation, round trips, fuzzing."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scripts.data.manifest import (
    DEFAULT_CT_WINDOW,
    FIELDS,
    FORMATS,
    MODALITIES,
    SourceDataset,
    load_manifest,
    parse_manifest,
    save_manifest,
)

VALID = {"name": "chest", "path": "images/*.png", "modality": "x-RAY", "dimension": 2}


def write_json(tmp_path: Path, entries: list[Any]) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"datasets": entries}))
    return path


def test_json_defaults_and_canonical_values(tmp_path: Path) -> None:
    path = write_json(tmp_path, [
        VALID,
        {"name": "ct", "path": "/abs/ct", "modality": "ct", "dimension": 3, "format": "NIfTI"},
        {"name": "mr", "path": "mr", "modality": "MRI", "dimension": 3, "slice_axis": 0, "label": "brain",
         "window": [0, 500]},
    ])
    chest, ct, mr = load_manifest(path)
    assert chest == SourceDataset("chest", tmp_path.resolve() / "images/*.png", "X-ray", 2, label="X-ray")
    assert chest.slice_axis is None and chest.window is None and chest.format is None
    assert (ct.modality, ct.path, ct.slice_axis, ct.window, ct.label, ct.format) == (
        "CT", Path("/abs/ct"), 2, DEFAULT_CT_WINDOW, "CT", "nifti")
    assert (mr.slice_axis, mr.label, mr.window) == (0, "brain", (0.0, 500.0))


def test_csv_matches_json(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"
    path.write_text(
        "name,path,modality,dimension,slice_axis,label,window,format\n"
        "chest,images/*.png,x-RAY,2,,,,\n"
        'mr,mr,MRI,3,0,brain,"0,500",\n'
        "\n"
        'ct,/abs/ct,ct,3,,,"[-160, 240]",dicom-series\n'
    )
    chest, mr, ct = load_manifest(path)
    assert chest == SourceDataset("chest", tmp_path.resolve() / "images/*.png", "X-ray", 2)
    assert (mr.slice_axis, mr.label, mr.window) == (0, "brain", (0.0, 500.0))
    assert (ct.window, ct.format, ct.path) == ((-160.0, 240.0), "dicom-series", Path("/abs/ct"))


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    entries = [
        SourceDataset("a", tmp_path / "a" / "*.png", "colour", 2, label="skin", format="png"),
        SourceDataset("b", tmp_path / "b", "ct", 3, slice_axis=1, window=(-160, 240)),
        SourceDataset("c", Path("/elsewhere/c.nii.gz"), "PET", 3),
    ]
    path = save_manifest(entries, tmp_path / f"manifest{suffix}")
    assert load_manifest(path) == entries
    text = path.read_text()
    assert str(tmp_path) not in text and "/elsewhere/c.nii.gz" in text  # relative below the manifest only


@pytest.mark.parametrize(
    ("entry", "fragments"),
    [
        ({**VALID, "colour": "red"}, ["'chest'", "unknown field", "'colour'"]),
        ({**VALID, "dimension": "2"}, ["'chest'", "'dimension'", "integer"]),
        ({**VALID, "dimension": 2.0}, ["'chest'", "'dimension'", "integer"]),
        ({**VALID, "dimension": True}, ["'chest'", "'dimension'", "integer"]),
        ({**VALID, "dimension": 4}, ["'chest'", "'dimension'", "2 or 3"]),
        ({**VALID, "name": 7}, ["entry 1", "'name'", "string"]),
        ({**VALID, "modality": "sonar"}, ["'chest'", "'modality'", "sonar", "ultrasound"]),
        ({**VALID, "modality": ["CT"]}, ["'chest'", "'modality'", "string"]),
        ({**VALID, "slice_axis": 1}, ["'chest'", "'slice_axis'", "3D"]),
        ({**VALID, "dimension": 3, "slice_axis": 3}, ["'chest'", "'slice_axis'", "0, 1 or 2"]),
        ({**VALID, "window": [1, 0]}, ["'chest'", "'window'", "low < high"]),
        ({**VALID, "window": [0, float("nan")]}, ["'chest'", "'window'"]),
        ({**VALID, "window": "0,1"}, ["'chest'", "'window'"]),
        ({**VALID, "format": "tiff"}, ["'chest'", "'format'", "nifti"]),
        ({**VALID, "label": ""}, ["'chest'", "'label'"]),
        ({**VALID, "path": ""}, ["'chest'", "'path'"]),
        ({"name": "chest", "path": "x"}, ["'chest'", "missing", "'modality'", "'dimension'"]),
        ([VALID], ["entry 1", "must be an object"]),
    ],
)
def test_invalid_entries_name_entry_and_field(tmp_path: Path, entry: Any, fragments: list[str]) -> None:
    path = write_json(tmp_path, [entry])
    with pytest.raises(ValueError) as caught:
        load_manifest(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_duplicate_names_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"entry 2: field 'name' duplicates the dataset name 'chest'"):
        load_manifest(write_json(tmp_path, [VALID, {**VALID, "modality": "CT"}]))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name,path,modality\nchest,x,CT\n", "missing required field(s) 'dimension'"),
        ("name,path,modality,dimension,size\n", "must name distinct columns"),
        ("name,path,modality,dimension\nchest,x,CT,two\n", "row 2: field 'dimension' must be an integer"),
        ("name,path,modality,dimension\nchest,x,CT,2,extra\n", "row 2: 5 cells"),
        ("name,path,modality,dimension,window\nchest,x,CT,2,low\n", "row 2: field 'window'"),
        ("", "empty"),
    ],
)
def test_invalid_csv(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as caught:
        load_manifest(path)
    assert str(path) in str(caught.value) and fragment in str(caught.value)


def test_unreadable_manifest_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.json: no such file"):
        load_manifest(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"manifest\.yaml: the file name must end in \.json or \.csv"):
        load_manifest(tmp_path / "manifest.yaml")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="binary.json: not UTF-8"):
        load_manifest(binary)
    for text, fragment in (("{", "not valid JSON"), ("[]", "single key"), ('{"datasets": {}}', "must be a list")):
        broken = tmp_path / "broken.json"
        broken.write_text(text)
        with pytest.raises(ValueError, match=fragment):
            load_manifest(broken)


# --- fuzzing: whatever the input, parsing returns entries or raises ValueError, nothing else ----------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.integers(), st.floats(), st.text(max_size=6))
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
PLAUSIBLE = {
    "name": st.text(min_size=1, max_size=5),
    "path": st.text(min_size=1, max_size=8),
    "modality": st.sampled_from([*MODALITIES, "mri", "x-RAY", "sonar", ""]),
    "dimension": st.sampled_from([2, 3, 0, -1]),
    "slice_axis": st.sampled_from([0, 1, 2, 3, -1]),
    "label": st.text(min_size=1, max_size=5),
    "window": st.lists(st.one_of(st.floats(), st.integers()), min_size=0, max_size=3),
    "format": st.sampled_from([*FORMATS, "NIFTI", "tif"]),
}
REQUIRED_FIELDS = ("name", "path", "modality", "dimension")
OPTIONAL_FIELDS = {key: PLAUSIBLE[key] | JSON_VALUES for key in PLAUSIBLE if key not in REQUIRED_FIELDS}
ENTRIES = st.one_of(
    st.fixed_dictionaries({key: PLAUSIBLE[key] for key in REQUIRED_FIELDS}, optional=OPTIONAL_FIELDS),
    st.fixed_dictionaries({key: PLAUSIBLE[key] | JSON_VALUES for key in REQUIRED_FIELDS}, optional=OPTIONAL_FIELDS),
    st.dictionaries(st.sampled_from([*FIELDS, "extra"]), JSON_VALUES, max_size=9),
    JSON_VALUES,
)
DATASETS = st.fixed_dictionaries({"datasets": st.lists(ENTRIES, max_size=4)})
DOCUMENTS = st.one_of(  # mostly well-formed documents, so that most examples reach the entry checks
    DATASETS,
    DATASETS,
    DATASETS,
    st.dictionaries(st.sampled_from(["datasets", "version"]), st.lists(ENTRIES, max_size=3), max_size=2),
    JSON_VALUES,
)
CELLS = st.one_of(st.text(max_size=6), *[strategy.map(str) for strategy in PLAUSIBLE.values()])


def parse_or_value_error(text: str, kind: str, base: Path) -> None:
    try:
        entries = parse_manifest(text, kind, base)
    except ValueError:
        return
    assert all(isinstance(entry, SourceDataset) for entry in entries)


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(document=DOCUMENTS, raw=st.text(max_size=30), use_raw=st.booleans())
def test_fuzz_json_only_raises_value_error(document: Any, raw: str, use_raw: bool) -> None:
    parse_or_value_error(raw if use_raw else json.dumps(document), "json", Path("/data"))


@FUZZ
@given(
    header=st.lists(st.sampled_from([*FIELDS, "size", ""]), max_size=9) | st.lists(st.text(max_size=4), max_size=4),
    rows=st.lists(st.lists(CELLS, max_size=10), max_size=4),
    raw=st.text(max_size=40),
    use_raw=st.booleans(),
)
def test_fuzz_csv_only_raises_value_error(header: list[str], rows: list[list[str]], raw: str, use_raw: bool) -> None:
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    parse_or_value_error(raw if use_raw else buffer.getvalue(), "csv", Path("/data"))

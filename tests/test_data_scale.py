"""The data layer at scale: the header cache that lets a restart skip re-reading headers
(scripts/data/header_cache.py), the generator of benchmarks/data_scale.py, and smoke runs of the data
benchmarks (no timing asserted)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from benchmarks import augmentation, data_scale
from scripts.data.header_cache import header_cache_path
from scripts.data.manifest import load_manifest
from scripts.data.slices import PretrainSliceDataset
from scripts.make_manifest import make_manifest


@pytest.fixture()
def collection(tmp_path: Path) -> Path:
    images, volumes = data_scale.generate_tree(tmp_path / "data", 1000)
    assert (images, volumes) == (1000, 10)
    manifest = tmp_path / "manifest.json"
    make_manifest(tmp_path / "data", manifest, {"xray": "X-ray", "ct": "CT"})
    return manifest


def test_generated_tree_indexes_as_expected(collection: Path) -> None:
    entries = load_manifest(collection)
    assert {entry.modality for entry in entries} == {"X-ray", "CT"} and len(entries) == 2
    dataset = PretrainSliceDataset(collection, on_error="raise")
    assert len(dataset) == 1000 + 10 * 4 and dataset.headers_read == 1010 and dataset.headers_reused == 0
    assert dataset[0]["image"].shape == (1, 8, 8) and dataset[len(dataset) - 1]["image"].shape == (1, 8, 8)


def test_restart_reuses_headers_and_rereads_changed_files(collection: Path) -> None:
    first = PretrainSliceDataset(collection)
    cache = header_cache_path(collection)
    assert cache.is_file() and len(json.loads(cache.read_text())["headers"]) == 1010
    again = PretrainSliceDataset(collection)
    assert (again.headers_reused, again.headers_read) == (1010, 0)
    assert again._index == first._index and [i.header for i in again._images] == [i.header for i in first._images]

    changed = next((collection.parent / "data" / "ct").rglob("*.nii.gz"))
    status = changed.stat()
    os.utime(changed, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))  # rewritten: same size, newer
    removed = next((collection.parent / "data" / "xray").rglob("*.png"))
    removed.unlink()
    after = PretrainSliceDataset(collection)
    assert (after.headers_reused, after.headers_read) == (1008, 1)
    assert str(removed.resolve()) not in json.loads(cache.read_text())["headers"]  # forgotten


def test_unreadable_cache_is_rebuilt_and_cache_can_be_off(collection: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = header_cache_path(collection)
    cache.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="lvmmed.data"):
        dataset = PretrainSliceDataset(collection)
    assert dataset.headers_read == 1010 and "unreadable" in caplog.text
    assert PretrainSliceDataset(collection).headers_reused == 1010  # rewritten
    cache.unlink()
    assert PretrainSliceDataset(collection, header_cache=False).headers_read == 1010 and not cache.exists()
    assert PretrainSliceDataset(load_manifest(collection)).headers_read == 1010 and not cache.exists()
    elsewhere = collection.parent / "elsewhere.json"
    PretrainSliceDataset(collection, header_cache=elsewhere)
    assert PretrainSliceDataset(collection, header_cache=elsewhere).headers_reused == 1010


def test_read_only_folder_only_warns(collection: Path, caplog: pytest.LogCaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr("scripts.data.header_cache.write_atomically", refuse)
    with caplog.at_level(logging.WARNING, logger="lvmmed.data"):
        dataset = PretrainSliceDataset(collection)
    assert len(dataset) == 1040 and "could not write the header cache" in caplog.text


def test_augmentation_benchmark_quick() -> None:
    report = augmentation.run(quick=True)
    text = report.render()
    assert "batched / per-sample" in text and "grey" in text and "colour" in text
    assert all(target.met is None for target in report.targets)  # quick: not judged


@pytest.mark.slow  # six fresh interpreters (torch, MONAI imports): about a minute on 2 loaded cores
def test_data_scale_benchmark_quick(tmp_path: Path) -> None:
    report = data_scale.run(quick=True, root=tmp_path)
    text = report.render()
    assert "1,000 + 10" in text and "restart" in text
    assert report.targets[-1].met  # every header reused on restart
    assert not list(tmp_path.iterdir())  # the generated files are deleted

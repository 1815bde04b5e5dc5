"""The SSL benchmark data (scripts/data/ssl_benchmark.py) and the study (benchmarks/ssl_study.py)."""

from __future__ import annotations

import inspect
import json
import math
import multiprocessing
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.ssl_study import (CEILING, DEFAULT_ROW, QUICK, RANDOM_INIT, V2, StudySettings, _missing_seeds, main,
                                  report, study_rows, tuning_rows, weighted_knn_accuracy)
from scripts.classification.datalist import load_split
from scripts.data.slices import PretrainSliceDataset
from scripts.data.ssl_benchmark import CLASSES, MODALITIES, BenchmarkSizes, draw_case, prepare_ssl_benchmark
from scripts.objective.lvmmed_loss import LVMMedLoss
from scripts.segmentation.datalist import read_split


def test_weighted_knn_weights_votes_by_similarity() -> None:
    # two training images of class 0 very close to the query, three of class 1 further away: a majority vote of
    # the five picks class 1, the exp(s / 0.1) weighting picks class 0
    train = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.6, 0.8], [0.6, -0.8], [0.5, 0.86]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.01]])
    assert weighted_knn_accuracy(train, labels, query, torch.tensor([0]), k=5, temperature=0.1) == 1.0
    assert weighted_knn_accuracy(train, labels, query, torch.tensor([0]), k=5, temperature=100.0) == 0.0
    assert weighted_knn_accuracy(train, labels, query, torch.tensor([0]), k=50) == 1.0  # k capped at M


def test_weighted_knn_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="features"):
        weighted_knn_accuracy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one class per feature row"):
        weighted_knn_accuracy(torch.randn(4, 3), torch.zeros(3, dtype=torch.long), torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


def test_lambda_rows_scale_the_objective_default() -> None:
    default = inspect.signature(LVMMedLoss).parameters["lambda_"].default
    lambdas = {row.name: row.pretrain_overrides.get("loss#lambda_") for row in study_rows() if row.pretrain_overrides}
    assert lambdas["lambda = default/10"] == pytest.approx(default / 10)
    assert lambdas["lambda = default*10"] == pytest.approx(default * 10)
    ablations = {row.name: row.pretrain_overrides for row in study_rows() if row.group == "ablation"}
    assert {key for overrides in ablations.values() for key in overrides} == {
        "loss#second_order", "loss#message_passing", "loss#noise", "loss#local_similarity"}


def test_draw_case_is_deterministic_and_labels_the_lesion() -> None:
    for modality in MODALITIES:
        for shape_class in CLASSES:
            image, labels = draw_case(np.random.RandomState(7), modality, shape_class)
            again, labels_again = draw_case(np.random.RandomState(7), modality, shape_class)
            assert np.array_equal(image, again) and np.array_equal(labels, labels_again)
            assert image.shape[:2] == labels.shape == (64, 64) and 0.0 <= image.min() <= image.max() <= 1.0
            assert set(np.unique(labels)) == {0, 1, 2}
            assert image.ndim == (3 if modality == "fundus" else 2)
    with pytest.raises(ValueError, match="modality"):
        draw_case(np.random.RandomState(0), "pet", "disc")
    with pytest.raises(ValueError, match="shape_class"):
        draw_case(np.random.RandomState(0), "ct", "star")


def test_shape_classes_differ_in_lesion_geometry() -> None:
    """The class is the lesion's shape: a ring's lesion has a hole, a disc's is convex-like and filled."""
    from scipy.ndimage import binary_fill_holes

    ring = draw_case(np.random.RandomState(3), "ct", "ring")[1] == 2
    disc = draw_case(np.random.RandomState(3), "ct", "disc")[1] == 2
    assert binary_fill_holes(ring).sum() > 1.3 * ring.sum()
    assert binary_fill_holes(disc).sum() == disc.sum()


def test_benchmark_files(tmp_path: Path) -> None:
    sizes = BenchmarkSizes(pool_per_modality=2, training_per_group=2, validation_per_group=1, test_per_group=1)
    paths = prepare_ssl_benchmark(tmp_path, sizes)
    groups = len(MODALITIES) * len(CLASSES)
    splits = {split: load_split(paths.classification_datalist, split) for split in ("training", "validation", "test")}
    assert {split: len(items) for split, items in splits.items()} == {"training": 2 * groups, "validation": groups, "test": groups}
    files = [{item["image"] for item in items} for items in splits.values()]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
    assert {item["class"] for item in splits["training"]} == set(CLASSES)
    pool = PretrainSliceDataset(paths.manifest)
    names = {entry.name for entry in pool.entries}
    assert {"pydicom-CT_small", "pydicom-MR_small", "nibabel-anatomical", "nibabel-example4d"} <= names
    assert set(pool.modalities) == set(MODALITIES.values())
    assert not pool.skipped
    assert pool[0]["image"].ndim == 3
    segmentation = read_split(paths.segmentation_dir / "datalist.json", "test", paths.segmentation_dir)
    assert len(segmentation) == groups
    mask = np.asarray(Image.open(segmentation[0]["label"]))
    assert set(np.unique(mask)) == {0, 1, 2}
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.png")}
    prepare_ssl_benchmark(tmp_path, sizes)
    assert before == {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.png")}
    with pytest.raises(ValueError, match="use another root"):
        prepare_ssl_benchmark(tmp_path, BenchmarkSizes(pool_per_modality=3))


def test_benchmark_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="pool_per_modality"):
        BenchmarkSizes(pool_per_modality=0)
    with pytest.raises(TypeError, match="sizes"):
        prepare_ssl_benchmark("unused", sizes=(1, 1, 1, 1))  # type: ignore[arg-type]


def test_quick_study_runs_every_row_and_writes_the_report(tmp_path: Path) -> None:
    output = tmp_path / "ssl_study.md"
    main(["--quick", "--data-root", str(tmp_path / "data"), "--output", str(output)])
    text = output.read_text()
    for row in [*study_rows(), CEILING]:
        name = row if isinstance(row, str) else row.name
        assert f"| {name} |" in text
    assert output.with_suffix(".png").stat().st_size > 1000
    assert "Goal" in text and "python -m benchmarks.ssl_study --quick" in text
    runs = json.loads(output.with_suffix(".json").read_text())["runs"]
    assert len(runs) == len(study_rows()) + 1
    for name, seeds in runs.items():
        assert sorted(seeds) == [str(seed) for seed in (QUICK.seeds[:1] if name == CEILING else QUICK.seeds)]
        for figures in seeds.values():
            for key, value in figures.items():
                assert math.isfinite(value), (name, key)
                if key == "effective_rank":
                    assert 1.0 <= value, (name, value)
                elif key not in ("seconds_per_iteration", "gradient_norm_edge_to_vertex"):
                    assert 0.0 <= value <= 1.0, (name, key, value)
        if name not in ("random init (no pretraining)", CEILING):
            assert all(figures["seconds_per_iteration"] > 0 for figures in seeds.values())
        if name.startswith(("LVM-Med", "w/o", "lambda")):  # the objective's learning-signal statistics per row
            assert all({"match_accuracy", "zero_gradient_step_share"} <= set(figures) for figures in seeds.values())
        if name == "LVM-Med (defaults)":  # the path ratio, on steps with a gradient
            assert all(figures["gradient_norm_edge_to_vertex"] > 0 for figures in seeds.values()
                       if figures["zero_gradient_step_share"] < 1)
    assert "Learning signal" in text and "effective rank" in text


def test_tuning_gives_every_method_the_same_number_of_trials() -> None:
    rows = tuning_rows()
    methods = Counter(row.name.split(" [")[0] for row in rows)
    assert set(methods) == {"LVM-Med", "SimCLR", "VICReg", "Barlow Twins"}
    assert len(set(methods.values())) == 1 and min(methods.values()) >= 2
    assert len({row.name for row in rows}) == len(rows)
    with pytest.raises(SystemExit, match="validation"):
        main(["--quick", "--tune", "--split", "test"])


def test_a_tuning_report_has_its_own_title_and_no_goal_section(tmp_path: Path) -> None:
    figures = {"probe": (0.3, 0.01), "dice": (0.7, 0.02), "score": (0.5, 0.01)}
    trials = {row.name: figures for row in tuning_rows()[:2]}
    tuning = report(trials, V2, "python -m benchmarks.ssl_study --tune", 60.0, tmp_path / "t.png")
    assert tuning.startswith("# Study v2: tuning trials (test split)") and "## Goal" not in tuning
    study = report({RANDOM_INIT: figures, DEFAULT_ROW: figures}, V2, "python -m benchmarks.ssl_study", 60.0,
                   tmp_path / "s.png")
    assert study.startswith("# LVM-Med against its ablations") and "## Goal" in study


def test_v2_settings_give_4x4_maps_and_a_large_test_split() -> None:
    assert V2.image_size // V2.output_stride >= 4
    assert V2.benchmark.test_per_group * len(MODALITIES) * len(CLASSES) >= 625  # standard error <= 0.02
    with pytest.raises(ValueError, match="output_stride"):
        StudySettings(encoder="resnet50", output_stride=16)


def test_near_duplicate_pool_is_volumes_of_adjacent_slices(tmp_path: Path) -> None:
    sizes = BenchmarkSizes(pool_per_modality=8, training_per_group=1, validation_per_group=1, test_per_group=1,
                           slices_per_volume=4)
    paths = prepare_ssl_benchmark(tmp_path, sizes)
    pool = PretrainSliceDataset(paths.manifest)
    generated = [entry for entry in pool.entries if entry.name.startswith("generated-")]
    assert len(generated) == len(MODALITIES) and all(entry.dimension == 3 for entry in generated)
    volume = np.asarray(nib.load(sorted((tmp_path / "pool" / "ct").glob("*.nii.gz"))[0]).dataobj)
    assert volume.shape == (64, 64, 4)
    adjacent = np.abs(np.diff(volume, axis=-1)).mean()
    other = np.abs(volume - np.asarray(nib.load(sorted((tmp_path / "pool" / "ct").glob("*.nii.gz"))[1]).dataobj)).mean()
    assert adjacent < 0.2 * other  # consecutive slices are near-duplicates, other volumes are not


def test_merge_joins_rows_run_in_separate_processes(tmp_path: Path) -> None:
    data = ["--quick", "--data-root", str(tmp_path / "data")]
    main([*data, "--rows", RANDOM_INIT, "--output", str(tmp_path / "a" / "study.md")])
    main([*data, "--rows", "SimCLR", "--output", str(tmp_path / "b" / "study.md")])
    records = [tmp_path / name / "study.json" for name in ("a", "b")]
    main([*data, "--rows", RANDOM_INIT, "SimCLR", "--merge", *map(str, records), "--output", str(tmp_path / "study.md")])
    merged = json.loads((tmp_path / "study.json").read_text())
    parts = [json.loads(record.read_text()) for record in records]
    assert merged["runs"] == {**parts[0]["runs"], **parts[1]["runs"]}  # nothing rerun
    assert merged["seconds"] == pytest.approx(parts[0]["seconds"] + parts[1]["seconds"])
    assert "| SimCLR |" in (tmp_path / "study.md").read_text()
    main([*data, "--resume", "--report-only", "--output", str(tmp_path / "study.md")])  # every row missing: none runs
    assert json.loads((tmp_path / "study.json").read_text())["runs"] == merged["runs"]
    assert "| VICReg |" not in (tmp_path / "study.md").read_text()
    assert multiprocessing.active_children() == []  # no pretraining loader workers left behind by the rows
    parts[1]["runs"]["SimCLR"]["0"]["probe"] += 0.1
    records[1].write_text(json.dumps(parts[1]))
    with pytest.raises(ValueError, match="other figures for 'SimCLR'"):
        main([*data, "--rows", "SimCLR", "--merge", str(records[1]), "--output", str(tmp_path / "study.md"), "--resume"])
    with pytest.raises(ValueError, match="other settings"):
        main([*data, "--seeds", "1", "--merge", str(records[0]), "--rows", RANDOM_INIT, "--output", str(tmp_path / "c.md")])


def test_report_names_the_seeds_held_when_a_study_is_cut_short() -> None:
    settings = StudySettings(seeds=(0, 1, 2))
    assert _missing_seeds(settings, {RANDOM_INIT: [0, 1, 2], "SimCLR": [0, 1, 2], CEILING: [0]}) == ""
    held = _missing_seeds(settings, {RANDOM_INIT: [0, 1, 2], "SimCLR": [0, 1], "VICReg": [0, 1], CEILING: [0]})
    assert held == f" planned (**held**: 0, 1, 2 for {RANDOM_INIT}; 0, 1 for SimCLR, VICReg)"
    assert _missing_seeds(settings, {"SimCLR": [0], "VICReg": [0]}) == " planned (**held**: 0 for every row)"

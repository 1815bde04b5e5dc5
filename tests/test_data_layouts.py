"""Standard dataset layouts in (issue 22, items 2 and 3): an MSD task folder, folders of image/mask pairs, a folder per
class, a datalist JSON anywhere; read without writing into the user's folder, with one-line errors naming the file.

Fast tests read each layout; the slow ones run train -> evaluate -> inference on each, on tiny data made here, and
check that the masks come out in the input's geometry.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from PIL import Image

from conftest import REPO_ROOT
from scripts.classification.datalist import class_folder_datalist, class_names, load_split
from scripts.config_checks import ConfigValueError
from scripts.data.layouts import LayoutError, class_folder_splits, draw_validation
from scripts.make_datalist import main as make_datalist_main
from scripts.make_datalist import make_datalist
from scripts.segmentation.datalist import SegmentationDataError, check_items, dataset_splits, inference_items
from test_seg_workflows import run, workflow
from class_images import class_pixels

pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")

AFFINE = np.array([[0.9, 0, 0, 5.0], [0, 0.8, 0, -3.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
SEG = {"image_size": 32, "batch_size": 4, "num_workers": 0, "num_classes": 2}
TINY_VIT = {"_target_": "scripts.networks.sam_vit.SamViTEncoder", "img_size": 32, "patch_size": 8, "embed_dim": 16,
            "depth": 2, "num_heads": 2, "out_chans": 8, "window_size": 2, "global_attn_indexes": [1]}


def snapshot(folder: Path) -> dict[str, int]:
    """Every file below ``folder`` with its size: what a run must leave as it found it."""
    return {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*")) if path.is_file()}


def nifti_case(image: Path, label: Path | None, rng: np.random.Generator, channels: int = 2,
               shape: tuple[int, int, int] = (20, 24, 3)) -> None:
    """A volume of ``channels`` channels (channels last, as the MSD's BraTS task) and its binary label: a box that is
    bright in channel 0 and dark in channel 1."""
    mask = np.zeros(shape, np.uint8)
    mask[4:12, 6:16] = 1
    volume = rng.normal(0, 0.2, (*shape, channels)).astype(np.float32)
    volume[..., 0] += mask
    volume[..., -1] -= mask
    image.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, AFFINE), image)
    if label is not None:
        label.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(mask, AFFINE), label)


def msd_folder(root: Path, cases: int = 4, validation: int = 0) -> Path:
    """An MSD task folder: imagesTr/ labelsTr/ imagesTs/ and dataset.json with ``training`` and a string-list
    ``test`` (and ``validation`` items when asked), paths relative as the MSD writes them (``./imagesTr/...``)."""
    rng = np.random.default_rng(0)
    items = []
    for number in range(cases + validation):
        nifti_case(root / "imagesTr" / f"case_{number}.nii.gz", root / "labelsTr" / f"case_{number}.nii.gz", rng)
        items.append({"image": f"./imagesTr/case_{number}.nii.gz", "label": f"./labelsTr/case_{number}.nii.gz"})
    nifti_case(root / "imagesTs" / "case_t.nii.gz", None, rng)
    (root / "imagesTr" / "._case_0.nii.gz").write_bytes(b"macOS resource fork, as in the MSD archives")
    document = {"name": "Tiny", "modality": {"0": "A", "1": "B"}, "labels": {"0": "background", "1": "box"},
                "numTraining": cases, "training": items[:cases], "test": ["./imagesTs/case_t.nii.gz"]}
    if validation:
        document["validation"] = items[cases:]
    (root / "dataset.json").write_text(json.dumps(document))
    return root


def png_pair(image: Path, mask: Path | None, size: tuple[int, int] = (24, 40), value: int = 1) -> None:
    """A grey PNG (height, width = ``size``) with a bright square and, unless None, its mask."""
    pixels = np.full(size, 30, np.uint8)
    labels = np.zeros(size, np.uint8)
    pixels[4:14, 8:20], labels[4:14, 8:20] = 220, value
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(image)
    if mask is not None:
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels).save(mask)


def pairs_folder(root: Path, cases: int = 4) -> Path:
    """imagesTr/ + labelsTr/ (masks named ``<image>_mask.png``) and imagesTs/ without masks."""
    for number in range(cases):
        png_pair(root / "imagesTr" / f"p{number}.png", root / "labelsTr" / f"p{number}_mask.png")
    png_pair(root / "imagesTs" / "new.png", None, size=(30, 44))
    return root


def class_folder(root: Path, per_class: int = 6) -> Path:
    """``root/<class>/*.png`` for two classes, bright squares and dark stripes, in a nested folder for one."""
    rng = np.random.default_rng(0)
    for name in ("squares", "stripes"):
        for number in range(per_class):
            pixels = class_pixels(name, rng)
            path = root / name / ("patient_a" if number % 2 else "") / f"{name}_{number}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


# --- MSD --------------------------------------------------------------------------------------------------------

def test_msd_folder_draws_validation_by_seed_and_reads_test_strings(tmp_path: Path) -> None:
    root = msd_folder(tmp_path / "Task01_Tiny", cases=10)
    splits = dataset_splits(root, validation_fraction=0.2, seed=0)
    assert list(splits) == ["training", "validation", "test"]
    assert (len(splits["training"]), len(splits["validation"])) == (8, 2)
    assert splits["test"] == [{"image": str(root / "imagesTs" / "case_t.nii.gz")}]
    assert all(Path(item["image"]).parent == root / "imagesTr" for item in splits["training"])
    assert dataset_splits(root, 0.2, seed=0)["validation"] == splits["validation"]  # the same draw every time
    assert any(dataset_splits(root, 0.2, seed=seed)["validation"] != splits["validation"] for seed in (1, 2, 3))
    assert len(dataset_splits(root, 0.0, 0)["validation"]) == 0
    with pytest.raises(SegmentationDataError, match=r"Task01_Tiny: no split 'testing'; it has 'training', 'validation', 'test'"):
        splits["testing"]  # noqa: B018 - the lookup is what raises


def test_msd_validation_split_is_kept_and_multichannel_volumes_need_their_in_channels(tmp_path: Path) -> None:
    root = msd_folder(tmp_path / "msd", cases=3, validation=1)
    splits = dataset_splits(root, validation_fraction=0.5, seed=0)
    assert (len(splits["training"]), len(splits["validation"])) == (3, 1)  # the dataset's own split, nothing drawn
    assert len(check_items(splits["training"], in_channels=2)) == 3  # (x, y, z, 2) volumes with 3D labels
    with pytest.raises(SegmentationDataError, match=r"case_0\.nii\.gz: image has 2 channels but the network takes in_channels=3"):
        check_items(splits["training"], in_channels=3)
    with pytest.raises(SegmentationDataError, match=r"has no 'label'.*MSD test split has none"):
        check_items(splits["test"], in_channels=2)


# --- a datalist JSON anywhere -----------------------------------------------------------------------------------

def test_datalist_json_paths_resolve_against_its_own_folder_in_the_configs(tmp_path: Path) -> None:
    data = tmp_path / "project"
    for number in range(3):
        png_pair(data / "img" / f"a{number}.png", data / "seg" / f"a{number}.png")
    datalist = data / "lists" / "fold0.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps({"training": [{"image": f"../img/a{n}.png", "label": f"../seg/a{n}.png"}
                                                 for n in range(2)],
                                    "test": [{"image": "../img/a2.png", "label": "../seg/a2.png"}]}))
    flow = workflow("train.json", "train", datalist_file=str(datalist), validation_fraction=0.5, **SEG)
    training = flow.parser.get_parsed_content("train#dataset#data")
    validation = flow.parser.get_parsed_content("validate#dataset#data")
    assert sorted(Path(item["image"]).resolve() for item in training + validation) == \
        [(data / "img" / f"a{n}.png").resolve() for n in range(2)]
    evaluated = workflow("evaluate.json", "eval", datalist_file=str(datalist), **SEG).parser.get_parsed_content("dataset#data")
    assert [Path(item["label"]).resolve() for item in evaluated] == [(data / "seg" / "a2.png").resolve()]
    inferred = workflow("inference.json", "infer", datalist_file=str(datalist), **SEG).parser.get_parsed_content("datalist")
    assert [Path(item["image"]).resolve() for item in inferred] == [(data / "img" / "a2.png").resolve()]


# --- image/mask pairs -------------------------------------------------------------------------------------------

def test_pair_folders_match_masks_by_name_and_read_test_images_without_masks(tmp_path: Path) -> None:
    root = pairs_folder(tmp_path / "pairs")
    Image.open(root / "imagesTr" / "p3.png").convert("RGB").save(root / "imagesTr" / "p3.jpg")  # any extension
    (root / "imagesTr" / "p3.png").unlink()
    splits = dataset_splits(root, validation_fraction=0.25, seed=0)
    pairs = sorted((Path(i["image"]).name, Path(i["label"]).name) for i in splits["training"] + splits["validation"])
    assert pairs == [("p0.png", "p0_mask.png"), ("p1.png", "p1_mask.png"), ("p2.png", "p2_mask.png"),
                     ("p3.jpg", "p3_mask.png")]
    assert len(splits["validation"]) == 1 and splits["test"] == [{"image": str(root / "imagesTs" / "new.png")}]
    assert inference_items(root, "test") == splits["test"]

    flat = tmp_path / "flat"  # images/ + masks/, same names
    for number in range(2):
        png_pair(flat / "images" / f"x{number}.png", flat / "masks" / f"x{number}.png")
    assert len(dataset_splits(flat, 0.5, 0)["training"]) == 1
    with pytest.raises(SegmentationDataError, match=r"flat: no split 'test'; it has 'training', 'validation'"):
        inference_items(flat, "test")


@pytest.mark.parametrize("problem, message", [
    ("missing mask", r"imagesTr/p1\.png: no mask in .*labelsTr \(a mask has the image's name"),
    ("empty images", r"imagesTr: holds no PNG, JPEG, NIfTI or DICOM image"),
    ("no mask folder", r"imagesTr: no mask folder beside it \(expected labelsTr/ or masksTr/\)"),
    ("two masks", r"p0_seg\.png: a second mask for the image named 'p0'"),
    ("not a layout", r"plain: not a dataset folder: it holds no dataset\.json or datalist\.json"),
])
def test_bad_pair_layouts_stop_with_one_line_naming_the_file(tmp_path: Path, problem: str, message: str) -> None:
    root = pairs_folder(tmp_path / "pairs", cases=2)
    source = root
    if problem == "missing mask":
        (root / "labelsTr" / "p1_mask.png").unlink()
    elif problem == "empty images":
        for path in (root / "imagesTr").iterdir():
            path.unlink()
    elif problem == "no mask folder":
        for path in (root / "labelsTr").iterdir():
            path.unlink()
        (root / "labelsTr").rmdir()
    elif problem == "two masks":
        png_pair(root / "spare.png", root / "labelsTr" / "p0_seg.png")
    else:
        source = tmp_path / "plain"
        png_pair(source / "a.png", None)
    with pytest.raises(SegmentationDataError, match=message) as raised:
        dataset_splits(source, validation_fraction=0.2, seed=0)
    assert "\n" not in str(raised.value)


def test_make_datalist_writes_relative_paths_that_read_back_and_nothing_into_the_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = pairs_folder(tmp_path / "pairs")
    before = snapshot(root)
    output = tmp_path / "lists" / "datalist.json"
    assert make_datalist_main([str(root), "--output", str(output), "--validation_fraction", "0.25"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {output}: 3 training, 1 validation, 1 test"
    document = json.loads(output.read_text())
    assert {"image": "../pairs/imagesTr/p0.png", "label": "../pairs/labelsTr/p0_mask.png"} in \
        document["training"] + document["validation"]
    assert dict(dataset_splits(output)) == dict(dataset_splits(root, 0.25, 0))
    assert snapshot(root) == before
    assert make_datalist(root, tmp_path / "no_validation.json") == {"training": 4, "test": 1}

    (tmp_path / "empty").mkdir()
    assert make_datalist_main([str(tmp_path / "empty"), "--output", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'empty'}: not a dataset folder")
    assert not (tmp_path / "x.json").exists()


def test_multi_gpu_overlay_reads_a_pair_folder(tmp_path: Path) -> None:
    root = pairs_folder(tmp_path / "pairs")
    flow = workflow(["train.json", "multi_gpu_train.json"], "train", dataset_dir=str(root), validation_fraction=0.25,
                    **SEG)
    assert len(flow.parser.get_parsed_content("train#dataset#data")) == 3
    assert len(flow.parser.get_parsed_content("validate#dataset#data")) == 1


def test_a_missing_dataset_dir_is_named_before_anything_runs(tmp_path: Path) -> None:
    flow = workflow("train.json", "train", dataset_dir=str(tmp_path / "absent"), **SEG)
    with pytest.raises(Exception) as raised:  # noqa: PT011 - MONAI may wrap the error in its own
        flow.initialize()
    error = raised.value
    while error is not None and not isinstance(error, ConfigValueError):
        error = error.__cause__
    assert error is not None and str(error) == f"configs/train.json: dataset_dir={str(tmp_path / 'absent')!r}: no such folder"


# --- a folder per class -----------------------------------------------------------------------------------------

def test_class_folders_become_a_datalist_in_the_output_folder_not_the_users(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "mine")
    before = snapshot(root)
    datalist = class_folder_datalist(root, tmp_path / "run", validation_fraction=0.25, seed=0)
    assert datalist == tmp_path / "run" / "datalist.json" and snapshot(root) == before
    assert class_names(datalist) == ["squares", "stripes"]
    training, validation = load_split(datalist, "training"), load_split(datalist, "validation")
    assert (len(training), len(validation)) == (8, 4)
    assert {item["class"] for item in validation} == {"squares", "stripes"}
    assert all(Path(item["image"]).parent.parent.name == item["class"] or Path(item["image"]).parent.name == item["class"]
               for item in training + validation)

    flow = ConfigWorkflow(config_file=str(REPO_ROOT / "configs" / "train_cls.json"), workflow_type="train",
                          dataset_dir=str(root), output_dir=str(tmp_path / "config_run"), validation_fraction=0.25)
    assert flow.parser.get_parsed_content("class_names") == ["squares", "stripes"]
    assert {Path(item["image"]).is_relative_to(root) for item in flow.parser.get_parsed_content("train#dataset#data")} == {True}
    assert snapshot(root) == before


def test_class_split_folders_keep_their_splits(tmp_path: Path) -> None:
    class_folder(tmp_path / "mine" / "train")
    class_folder(tmp_path / "mine" / "val", per_class=2)
    class_folder(tmp_path / "mine" / "test", per_class=1)
    splits = class_folder_splits(tmp_path / "mine")
    assert {split: {name: len(images) for name, images in classes.items()} for split, classes in splits.items()} == {
        "training": {"squares": 6, "stripes": 6}, "validation": {"squares": 2, "stripes": 2},
        "test": {"squares": 1, "stripes": 1}}
    datalist = class_folder_datalist(tmp_path / "mine", tmp_path / "run")
    assert [len(load_split(datalist, split)) for split in ("training", "validation", "test")] == [12, 4, 2]


@pytest.mark.parametrize("problem, message", [
    ("loose image", r"mine: image loose\.png lies outside a class folder"),
    ("empty class", r"mine/empty: class folder holds no PNG, JPEG, NIfTI or DICOM image"),
    ("one class", r"mine: 1 class folder\(s\) \['squares'\]; classification needs at least two"),
    ("unknown class", r"mine: the validation split has class folder 'circles', which training lacks"),
    ("mixed", r"mine/squares: neither a split folder"),
])
def test_bad_class_folders_stop_with_one_line_naming_the_folder(tmp_path: Path, problem: str, message: str) -> None:
    root = class_folder(tmp_path / "mine", per_class=2)
    if problem == "loose image":
        png_pair(root / "loose.png", None)
    elif problem == "empty class":
        (root / "empty").mkdir()
    elif problem == "one class":
        for path in (root / "stripes").rglob("*.png"):
            path.unlink()
        for folder in sorted((root / "stripes").rglob("*"), reverse=True) + [root / "stripes"]:
            folder.rmdir()
    elif problem == "unknown class":
        class_folder(tmp_path / "split" / "train")
        png_pair(tmp_path / "split" / "val" / "circles" / "c.png", None)
        root = tmp_path / "split"
        message = message.replace("mine", "split")
    else:
        class_folder(root / "train")
    with pytest.raises(LayoutError, match=message) as raised:
        class_folder_splits(root)
    assert "\n" not in str(raised.value)


def test_draw_validation_keeps_order_holds_one_out_at_least_and_refuses_a_fraction_of_one() -> None:
    training, validation = draw_validation(list(range(10)), 0.01, 0, "data")
    assert len(validation) == 1 and training == sorted(training) and sorted(training + validation) == list(range(10))
    assert draw_validation([7], 0.5, 0, "data") == ([7], [])  # a single item is kept for training, with a warning
    with pytest.raises(LayoutError, match=r"data: validation_fraction must lie in \[0, 1\), got 1.0"):
        draw_validation([1, 2, 3], 1.0, 0, "data")


# --- end to end: train -> evaluate -> inference per layout --------------------------------------------------------

def _segment(tmp_path: Path, data: dict, evaluate_split: str, settings: dict) -> dict[str, str]:
    """Trains one epoch with ``settings``, then evaluates ``evaluate_split`` and segments the test split of the same
    ``data`` with none of them repeated (they are stored beside the model); returns the evaluated metrics' row of
    ``mean_dice`` (class name -> value)."""
    model = tmp_path / "model.pt"
    run(workflow("train.json", "train", **data, output_dir=str(tmp_path / "train"), best_model_path=str(model),
                 max_epochs=1, val_interval=1, **settings))
    run(workflow("evaluate.json", "eval", **data, checkpoint=str(model), output_dir=str(tmp_path / "evaluate"),
                 evaluate_split=evaluate_split))
    with open(tmp_path / "evaluate" / "per_class_metrics.csv") as file:
        rows = {row["metric"]: row for row in csv.DictReader(file)}
    assert set(rows) == {"mean_dice", "mean_iou", "hd95"}
    run(workflow("inference.json", "infer", **data, checkpoint=str(model), output_dir=str(tmp_path / "masks")))
    return rows["mean_dice"]


@pytest.mark.slow  # about 40 s on 2 cores; the pair-folder and datalist runs keep train -> evaluate -> inference in make test
def test_msd_multichannel_volumes_train_evaluate_and_segment_in_their_geometry(tmp_path: Path) -> None:
    root = msd_folder(tmp_path / "Task01_Tiny")
    before = snapshot(root)
    dice = _segment(tmp_path, {"dataset_dir": str(root)}, "validation",
                    {**SEG, "in_channels": 2, "validation_fraction": 0.25})
    assert "box" in dice  # the class names of dataset.json's labels
    mask = nib.load(tmp_path / "masks" / "case_t_seg.nii.gz")
    source = nib.load(root / "imagesTs" / "case_t.nii.gz")
    assert mask.shape == source.shape[:3] and np.allclose(mask.affine, source.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert snapshot(root) == before


def test_pair_folder_trains_evaluates_and_segments_pngs_at_their_size(tmp_path: Path) -> None:
    root = pairs_folder(tmp_path / "pairs")
    before = snapshot(root)
    _segment(tmp_path, {"dataset_dir": str(root)}, "validation", {**SEG, "validation_fraction": 0.25})
    with Image.open(tmp_path / "masks" / "new_seg.png") as mask, Image.open(root / "imagesTs" / "new.png") as source:
        assert mask.size == source.size == (44, 30)
    assert snapshot(root) == before


def test_datalist_json_elsewhere_trains_evaluates_and_segments(tmp_path: Path) -> None:
    data = tmp_path / "project"
    for number in range(4):
        png_pair(data / "img" / f"a{number}.png", data / "seg" / f"a{number}.png")
    datalist = tmp_path / "lists" / "datalist.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps({
        "training": [{"image": f"../project/img/a{n}.png", "label": f"../project/seg/a{n}.png"} for n in range(2)],
        "validation": [{"image": "../project/img/a2.png", "label": "../project/seg/a2.png"}],
        "test": [{"image": "../project/img/a3.png", "label": "../project/seg/a3.png"}]}))
    _segment(tmp_path, {"datalist_file": str(datalist)}, "test", SEG)
    with Image.open(tmp_path / "masks" / "a3_seg.png") as mask:
        assert mask.size == (40, 24)


def test_class_folders_train_and_infer_with_the_folder_names(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "mine")
    before = snapshot(root)
    paths = {"output_dir": str(tmp_path / "run"), "model_path": str(tmp_path / "c.pt"), "encoder": TINY_VIT}
    train = ConfigWorkflow(config_file=str(REPO_ROOT / "configs" / "train_cls.json"), workflow_type="train",
                           dataset_dir=str(root), max_epochs=1, pretrained_encoder=None, image_size=32, batch_size=4,
                           validation_fraction=0.34, **paths)
    run(train)
    # image size, class names, validation fraction and seed come from the settings stored beside the model
    infer = ConfigWorkflow(config_file=str(REPO_ROOT / "configs" / "inference_cls.json"), workflow_type="infer",
                           dataset_dir=str(root), **paths)
    run(infer)
    rows = list(csv.DictReader((tmp_path / "run" / "class_probabilities.csv").open()))
    assert len(rows) == 6 and list(rows[0]) == ["image", "prediction", "p_squares", "p_stripes"]  # 3 of 6 per class
    assert all(Path(row["image"]).is_relative_to(root) for row in rows)
    assert snapshot(root) == before

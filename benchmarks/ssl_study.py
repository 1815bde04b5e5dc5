"""LVM-Med against its ablations and standard self-supervised objectives, pretrained and evaluated alike.

``python -m benchmarks.ssl_study [--quick] [--encoder resnet18] [--output docs/ssl_study.md]``

Every row pretrains the same encoder on the fixed pool of :mod:`scripts.data.ssl_benchmark` through
``configs/pretrain.json`` (its ``PretrainModel``, ``TwoViewAugmentd`` views, Adam and schedule, handlers and
encoder export; only the objective differs, chosen by the config's own overrides) for the same number of
iterations, then evaluates the exported encoder three ways on the benchmark's labelled splits:

- weighted kNN (k=20, temperature 0.1: cosine similarities, votes exp(s / t) per class, training -> evaluated
  split, the protocol of the SSL libraries) on the frozen features of ``configs/train_cls.json``'s preprocessing;
- a linear probe on the frozen features: ``configs/train_cls.json`` with the encoder loaded, fixed epochs;
- U-Net fine-tuning: ``configs/train.json`` with the encoder loaded, fixed epochs, mean Dice of body and lesion.

Rows: random init (no pretraining), LVM-Med with the config's defaults, the paper's four ablations (switches of
``LVMMedLoss``), lambda at a tenth and ten times ``LVMMedLoss``'s default (read from its signature), SimCLR,
VICReg and Barlow Twins (``baseline_objectives`` of ``configs/pretrain.json``), each over several seeds; and a
supervised ceiling (``configs/train_cls.json`` fine-tuning the whole encoder with the labels). The pretraining
time per iteration is measured from the trainer's start to its end. The report (Markdown table of mean +- std,
a PNG plot, the machine and the command) goes to ``--output``; ``--quick`` runs every row at tiny sizes.

``--encoder resnet50`` (the default) is the bundle's ``ResNet50Encoder`` and ``ResNet50UNet``; ``resnet18`` (or
``resnet10``) is MONAI's smaller ResNet (``scripts.networks.resnet_features.ResNetFeatureEncoder``) with
MONAI's ``FlexibleUNet`` on the same backbone, a study option so that the full study fits a 2-core CPU.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.data import DataLoader, Dataset

from scripts.atomic_save import write_atomically
from scripts.classification.datalist import load_split
from scripts.data.ssl_benchmark import BenchmarkPaths, BenchmarkSizes, prepare_ssl_benchmark
from scripts.handlers.embedding_monitor import effective_rank
from scripts.objective.lvmmed_loss import LVMMedLoss

__all__ = ["Row", "StudySettings", "V2", "QUICK", "study_rows", "tuning_rows", "weighted_knn_accuracy", "run_study",
           "main"]

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIGS = REPOSITORY / "configs"
ENCODERS = ("resnet50", "resnet18", "resnet10")
# the paper's table 6 (ResNet-50; classification accuracy, segmentation Dice): mean of both per ablation
PAPER_TABLE_6 = {
    "LVM-Med (defaults)": (67.47, 83.05),
    "w/o second order (i)": (62.17, 80.21),
    "w/o message passing (ii)": (65.08, 81.19),
    "w/o Gumbel noise (iii)": (64.32, 81.37),
    "w/o local similarity (iv)": (65.67, 81.54),
}
RANDOM_INIT = "random init (no pretraining)"
CEILING = "supervised ceiling (labels)"
DEFAULT_ROW = "LVM-Med (defaults)"

logger = logging.getLogger("lvmmed.ssl_study")


@dataclass(frozen=True)
class Row:
    """One method of the study: ``pretrain_overrides`` of ``configs/pretrain.json`` (None: no pretraining)."""

    name: str
    pretrain_overrides: dict[str, Any] | None
    group: str


@dataclass(frozen=True)
class StudySettings:
    """Sizes of one study run (the same for every row)."""

    encoder: str = "resnet50"
    image_size: int = 32
    output_stride: int = 32
    batch_size: int = 16
    pretrain_epochs: int = 3
    iterations_per_epoch: int = 12
    probe_epochs: int = 3
    probe_learning_rate: float = 0.01
    segmentation_epochs: int = 2
    ceiling_epochs: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    evaluation_split: str = "test"
    benchmark: BenchmarkSizes = field(default_factory=BenchmarkSizes)
    # data-loader workers of the pretraining (None: the config's). Not part of a record's settings (repr=False): the
    # quick study's one-iteration rows take 0, as its processes' start and their shutdown (about 10 s per row when the
    # persistent workers are collected) cost more than the row itself
    loader_workers: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}.")
        if self.evaluation_split not in ("validation", "test"):
            raise ValueError(f"evaluation_split must be 'validation' or 'test', got {self.evaluation_split!r}.")
        for name in ("image_size", "batch_size", "pretrain_epochs", "iterations_per_epoch", "probe_epochs",
                     "segmentation_epochs", "ceiling_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not self.probe_learning_rate > 0:
            raise ValueError(f"probe_learning_rate must be positive, got {self.probe_learning_rate!r}.")
        if self.output_stride not in (16, 32) or (self.output_stride == 16 and self.encoder == "resnet50"):
            raise ValueError(f"output_stride must be 32, or 16 with a MONAI ResNet encoder, got {self.output_stride!r}.")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 (the ResNets downsample 32 times), got {self.image_size}.")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed.")

    @property
    def pretrain_iterations(self) -> int:
        return self.pretrain_epochs * self.iterations_per_epoch


QUICK = StudySettings(
    encoder="resnet10", image_size=32, output_stride=16, batch_size=4, pretrain_epochs=1, iterations_per_epoch=1,
    probe_epochs=1, segmentation_epochs=1, ceiling_epochs=1, seeds=(0,), benchmark=BenchmarkSizes(1, 1, 1, 1),
    loader_workers=0,
)
# Study v2 (issue 21): 4 x 4 feature maps (ResNet-10 without its max-pooling at 64 px), so that the local affinity
# compares cells; 150 iterations of batch 32; 32 test images per (modality, class) pair: 640 in all, a standard
# error of at most 0.02 per accuracy (sqrt(0.25 / 640)); 16 per pair (320) to tune on.
V2 = StudySettings(
    encoder="resnet10", image_size=64, output_stride=16, batch_size=32, pretrain_epochs=5, iterations_per_epoch=30,
    probe_epochs=10, segmentation_epochs=4, ceiling_epochs=10, seeds=(0, 1, 2),
    benchmark=BenchmarkSizes(pool_per_modality=96, training_per_group=10, validation_per_group=16, test_per_group=32),
)


def default_lambda() -> float:
    """``LVMMedLoss``'s default ``lambda_``, read from its signature (the lambda rows scale it by 0.1 and 10)."""
    return float(inspect.signature(LVMMedLoss).parameters["lambda_"].default)


def study_rows() -> list[Row]:
    """The rows of the study, in the report's order."""
    lam = default_lambda()
    return [
        Row(RANDOM_INIT, None, "reference"),
        Row(DEFAULT_ROW, {}, "LVM-Med"),
        Row("w/o second order (i)", {"loss#second_order": False}, "ablation"),
        Row("w/o message passing (ii)", {"loss#message_passing": False}, "ablation"),
        Row("w/o Gumbel noise (iii)", {"loss#noise": "none"}, "ablation"),
        Row("w/o local similarity (iv)", {"loss#local_similarity": False}, "ablation"),
        Row("lambda = default/10", {"loss#lambda_": lam / 10}, "lambda"),
        Row("lambda = default*10", {"loss#lambda_": lam * 10}, "lambda"),
        Row("SimCLR", {"loss": "@baseline_objectives#simclr"}, "baseline"),
        Row("VICReg", {"loss": "@baseline_objectives#vicreg"}, "baseline"),
        Row("Barlow Twins", {"loss": "@baseline_objectives#barlow_twins"}, "baseline"),
    ]


# the same number of tuning trials for every method, each with its values spelt out: LVM-Med as shipped (absolute
# Gumbel scale 0.1, every directed edge pair), with every switch of issue 21 (degree-normalised edges, Gumbel
# scale 2 x the affinities' spread) and with centred vertex affinities; SimCLR's temperature, VICReg's
# invariance/variance weights, Barlow Twins' off-diagonal weight. Each method's third trial went on from its first two
# (further in the direction of the better one; for LVM-Med the third lever, the centring)
TUNING_TRIALS: dict[str, list[dict[str, Any]]] = {
    "LVM-Med": [{"loss#noise_reference": "absolute", "loss#noise_scale": 0.1, "loss#edge_normalisation": "none"},
                {"loss#noise_reference": "spread", "loss#noise_scale": 2.0, "loss#edge_normalisation": "degree"},
                {"loss#noise_reference": "absolute", "loss#noise_scale": 0.1, "loss#edge_normalisation": "none",
                 "loss#vertex_centring": True}],
    "SimCLR": [{"loss": "@baseline_objectives#simclr", "baseline_objectives#simclr#temperature": 0.5},
               {"loss": "@baseline_objectives#simclr", "baseline_objectives#simclr#temperature": 0.1},
               {"loss": "@baseline_objectives#simclr", "baseline_objectives#simclr#temperature": 1.0}],
    "VICReg": [{"loss": "@baseline_objectives#vicreg", "baseline_objectives#vicreg#sim_coeff": 25.0,
                "baseline_objectives#vicreg#std_coeff": 25.0},
               {"loss": "@baseline_objectives#vicreg", "baseline_objectives#vicreg#sim_coeff": 10.0,
                "baseline_objectives#vicreg#std_coeff": 10.0},
               {"loss": "@baseline_objectives#vicreg", "baseline_objectives#vicreg#sim_coeff": 5.0,
                "baseline_objectives#vicreg#std_coeff": 5.0}],
    "Barlow Twins": [{"loss": "@baseline_objectives#barlow_twins",
                      "baseline_objectives#barlow_twins#lambda_offdiag": 0.005},
                     {"loss": "@baseline_objectives#barlow_twins",
                      "baseline_objectives#barlow_twins#lambda_offdiag": 0.02},
                     {"loss": "@baseline_objectives#barlow_twins",
                      "baseline_objectives#barlow_twins#lambda_offdiag": 0.05}],
}


def tuning_rows() -> list[Row]:
    """One row per tuning trial of each method (``TUNING_TRIALS``), named ``method [setting=value, ...]``: run them
    with ``--tune`` on the validation split and ship each method's best."""
    rows = []
    for method, trials in TUNING_TRIALS.items():
        for overrides in trials:
            shown = {key.split("#")[-1]: value for key, value in overrides.items() if key != "loss"}
            rows.append(Row(f"{method} [{', '.join(f'{k}={v}' for k, v in shown.items())}]", overrides, "tuning"))
    return rows


def weighted_knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.1,
) -> float:
    """Accuracy of the weighted kNN classifier of Wu et al. (CVPR 2018) as DINO and solo-learn report it: each test
    feature takes the ``k`` training features of highest cosine similarity s, each votes for its class with weight
    exp(s / temperature), and the class of largest total wins.

    Args:
        train_features: (M, D); train_labels: (M,) integer classes.
        test_features: (T, D); test_labels: (T,) integer classes.
        k: neighbours (capped at M).
        temperature: positive.
    """
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be (M, D) and (T, D), got {tuple(train_features.shape)} and {tuple(test_features.shape)}.")
    if train_labels.shape != train_features.shape[:1] or test_labels.shape != test_features.shape[:1]:
        raise ValueError("train_labels and test_labels must hold one class per feature row.")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k and temperature must be positive, got {k} and {temperature}.")
    similarity = F.normalize(test_features.float(), dim=1) @ F.normalize(train_features.float(), dim=1).T
    top, index = similarity.topk(min(k, train_features.shape[0]), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = torch.zeros(test_features.shape[0], num_classes).scatter_add_(1, train_labels[index], (top / temperature).exp())
    return float((votes.argmax(1) == test_labels).float().mean())


def _workflow(config: str, overrides: dict[str, Any]) -> ConfigWorkflow:
    """A bundle config with overrides, as ``python -m monai.bundle run`` builds it, initialised."""
    workflow = ConfigWorkflow(config_file=str(CONFIGS / config), workflow_type=None, logging_file=False,
                              **{"bundle_root": str(REPOSITORY), **overrides})
    workflow.initialize()
    return workflow


def _encoder_overrides(settings: StudySettings) -> dict[str, Any]:
    """The study option: MONAI's smaller ResNet as the encoder (nothing for the configs' own ResNet-50)."""
    if settings.encoder == "resnet50":
        return {}
    return {"encoder": {"_target_": "scripts.networks.resnet_features.ResNetFeatureEncoder",
                        "model_name": settings.encoder, "in_channels": 3, "output_stride": settings.output_stride}}


# the objective's learning-signal statistics of the last pretraining epoch (``ObjectiveStats``), reported per row
SIGNAL_STATISTICS = ("match_accuracy", "zero_gradient_step_share", "imle_nonzero_share", "gradient_norm_edge_to_vertex")


def pretrain(row: Row, seed: int, settings: StudySettings, paths: BenchmarkPaths,
             folder: Path) -> tuple[Path, dict[str, float]]:
    """Runs ``configs/pretrain.json`` for ``row``; returns the exported encoder and figures: the seconds per
    iteration and the objective's ``SIGNAL_STATISTICS`` of the last epoch (those it reports)."""
    export = folder / "encoder.pt"
    overrides = {
        "output_dir": str(folder / "pretrain"), "manifest": str(paths.manifest), "encoder_export_path": str(export),
        "image_size": settings.image_size, "batch_size": settings.batch_size, "max_epochs": settings.pretrain_epochs,
        "train#trainer#epoch_length": settings.iterations_per_epoch, "seed": seed, "monitor_interval": None,
        "checkpoint_interval": 10**9, "log_interval": 10**9, **_encoder_overrides(settings), **row.pretrain_overrides,
        **({} if settings.loader_workers is None else {"num_workers": settings.loader_workers}),
    }
    workflow = _workflow("pretrain.json", overrides)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    # iteration ends; the first iteration is left out of the time per iteration when there are others, as it holds
    # one-off costs (numba compiling the graph-matching solver, allocator warm-up)
    ends = [time.perf_counter()]
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: ends.append(time.perf_counter()))
    workflow.run()
    iterations = trainer.state.iteration
    if iterations != settings.pretrain_iterations:
        raise RuntimeError(f"{row.name}: pretraining ran {iterations} iterations, expected {settings.pretrain_iterations}.")
    figures = {name: float(trainer.state.metrics[name]) for name in SIGNAL_STATISTICS if name in trainer.state.metrics}
    workflow.finalize()
    timed = ends[1:] if len(ends) > 2 else ends
    figures["seconds_per_iteration"] = (timed[-1] - timed[0]) / (len(timed) - 1)
    return export, figures


@torch.no_grad()
def _features(classifier: torch.nn.Module, items: list[dict], transform: Callable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    classifier.eval()
    features, labels = [], []
    for batch in DataLoader(Dataset(items, transform), batch_size=64, shuffle=False):
        features.append(classifier.features(batch["image"].to(device)).cpu())
        labels.append(torch.as_tensor(batch["label"]))
    return torch.cat(features), torch.cat(labels)


def classify(encoder_file: Path | None, seed: int, settings: StudySettings, paths: BenchmarkPaths, folder: Path,
             linear_probe: bool = True) -> dict[str, float]:
    """``configs/train_cls.json`` on the benchmark, evaluated on ``settings.evaluation_split``: with
    ``linear_probe``, the kNN accuracy of the frozen features and the probe's accuracy after ``probe_epochs``;
    otherwise the accuracy of the whole classifier fine-tuned for ``ceiling_epochs`` on the labelled training split
    and the labelled pretraining pool (key ``supervised``)."""
    split = settings.evaluation_split
    epochs = settings.probe_epochs if linear_probe else settings.ceiling_epochs
    overrides = {
        "output_dir": str(folder / "classification"), "model_path": str(folder / "classifier.pt"),
        "datalist": str(paths.classification_datalist), "pretrained_encoder": str(encoder_file) if encoder_file else None,
        "image_size": settings.image_size, "max_epochs": epochs, "val_interval": epochs,
        "batch_size": 16, "seed": seed, "linear_probe": linear_probe,
        # a linear head on standardised features takes a larger step than fine-tuning (train_cls.json's 1e-3)
        "learning_rate": settings.probe_learning_rate if linear_probe else 1e-3,
        "validate#dataset#data": f"$scripts.classification.datalist.load_split(@datalist, '{split}')",
        **_encoder_overrides(settings),
    }
    if not linear_probe:  # the ceiling learns from every labelled image but the evaluated ones
        overrides["train#dataset#data"] = ("$scripts.classification.datalist.load_split(@datalist, 'training') + "
                                           "scripts.classification.datalist.load_split(@datalist, 'pool')")
    workflow = _workflow("train_cls.json", overrides)
    figures = {}
    if linear_probe:
        classifier = workflow.parser.get_parsed_content("network")
        transform = workflow.parser.get_parsed_content("validate#preprocessing")
        device = workflow.parser.get_parsed_content("device")
        train = _features(classifier, load_split(paths.classification_datalist, "training"), transform, device)
        evaluated = _features(classifier, load_split(paths.classification_datalist, split), transform, device)
        figures["knn"] = weighted_knn_accuracy(*train, *evaluated)
        figures["effective_rank"] = effective_rank(evaluated[0])
    workflow.run()
    figures["probe" if linear_probe else "supervised"] = float(
        workflow.parser.get_parsed_content("validate#evaluator").state.metrics["val_accuracy"])
    workflow.finalize()
    return figures


def segment(encoder_file: Path | None, seed: int, settings: StudySettings, paths: BenchmarkPaths, folder: Path) -> float:
    """``configs/train.json`` fine-tuning a U-Net on the benchmark's masks; mean Dice on the evaluated split."""
    split = settings.evaluation_split
    overrides: dict[str, Any] = {
        "output_dir": str(folder / "segmentation"), "best_model_path": str(folder / "unet.pt"),
        "dataset_dir": str(paths.segmentation_dir), "in_channels": 3, "num_classes": 3, "resume": False,
        "pretrained_encoder": str(encoder_file) if encoder_file else None, "image_size": settings.image_size,
        "max_epochs": settings.segmentation_epochs, "val_interval": settings.segmentation_epochs,
        "batch_size": 16, "seed": seed, "log_interval": 10**9, "cache_rate": 1.0,
        "validate#dataloader#batch_size": 20,  # equal-sized 2D cases: batched inference, same Dice
        "validate#dataset#data": f"$scripts.segmentation.datalist.check_items(@data_splits['{split}'], @in_channels)",
    }
    if settings.encoder != "resnet50":
        overrides["network_def"] = {
            "_target_": "monai.networks.nets.FlexibleUNet", "in_channels": "@in_channels",
            "out_channels": "@num_classes", "backbone": settings.encoder, "pretrained": False, "spatial_dims": 2,
            "is_pad": True,
        }
    workflow = _workflow("train.json", overrides)
    workflow.run()
    dice = float(workflow.parser.get_parsed_content("validate#evaluator").state.metrics["val_mean_dice"])
    workflow.finalize()
    return dice


def run_row(row: Row, seed: int, settings: StudySettings, paths: BenchmarkPaths) -> dict[str, float]:
    """Pretrains (unless random init) and evaluates one (row, seed); figures keyed knn, probe, dice, seconds_per_iteration."""
    folder = Path(tempfile.mkdtemp(prefix="ssl_study_"))
    try:
        figures: dict[str, float] = {}
        encoder_file = None
        if row.pretrain_overrides is not None:
            encoder_file, pretraining_figures = pretrain(row, seed, settings, paths, folder)
            figures.update(pretraining_figures)
        figures.update(classify(encoder_file, seed, settings, paths, folder))
        figures["dice"] = segment(encoder_file, seed, settings, paths, folder)
        return figures
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        # the pretraining loader's persistent workers end with its iterator, which Ignite's engine keeps in reference
        # cycles: collect them now, or every row of a long study leaves its workers (and their memory) behind
        gc.collect()


def run_ceiling(seed: int, settings: StudySettings, paths: BenchmarkPaths) -> dict[str, float]:
    """The supervised ceiling: ``configs/train_cls.json`` fine-tuning the whole encoder from random init."""
    folder = Path(tempfile.mkdtemp(prefix="ssl_study_"))
    try:
        return classify(None, seed, settings, paths, folder, linear_probe=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; the deviation is NaN for a single value (shown as "1 seed")."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else float("nan")


def summarise(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and sample std over seeds of every figure of every row, plus ``score``: mean of probe and Dice."""
    summary = {}
    for name, runs in results.items():
        keys = sorted({key for run in runs for key in run})
        row = {key: _mean_std([run[key] for run in runs]) for key in keys}
        if "probe" in keys and "dice" in keys:
            row["score"] = _mean_std([(run["probe"] + run["dice"]) / 2 for run in runs])
        summary[name] = row
    return summary


def verdict(summary: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """Sentences on the issue's goal, computed from the summary."""
    if DEFAULT_ROW not in summary or RANDOM_INIT not in summary:
        return [f"The goal needs the rows {DEFAULT_ROW!r} and {RANDOM_INIT!r}; this run has only {sorted(summary)}."]
    lines = []
    default = summary[DEFAULT_ROW]["score"]
    others = {name: row["score"] for name, row in summary.items() if name not in (DEFAULT_ROW, RANDOM_INIT, CEILING)}
    beaten_by = [name for name, score in others.items() if score[0] >= default[0]]
    if beaten_by:
        lines.append(f"**Goal not met**: on the mean of linear-probe accuracy and Dice, LVM-Med with the defaults "
                     f"({default[0]:.3f}) is not ahead of: {', '.join(f'{n} ({others[n][0]:.3f})' for n in beaten_by)}.")
    else:
        lines.append(f"LVM-Med with the defaults ({default[0]:.3f}) is ahead of every baseline and ablation on the mean "
                     "of linear-probe accuracy and Dice.")
    random = summary[RANDOM_INIT]["score"]
    margin = default[0] - random[0]
    spread = 2 * np.nanmax([default[1], random[1], 0.0])
    lines.append(f"Against random init ({random[0]:.3f}): the difference is {margin:+.3f}, "
                 f"{'more' if margin > spread else '**not** more'} than two standard deviations ({spread:.3f}).")
    paper = sorted((name for name in PAPER_TABLE_6 if name != DEFAULT_ROW), key=lambda n: sum(PAPER_TABLE_6[n]))
    ours = sorted((name for name in paper if name in summary), key=lambda n: summary[n]["score"][0])
    lines.append("Ablations from most to least harmful, paper's table 6: " + " < ".join(paper) + "; here: "
                 + " < ".join(f"{n} ({summary[n]['score'][0]:.3f})" for n in ours)
                 + (" (same order)." if ours == paper else " (a different order)."))
    return lines


def _cell(summary_row: dict[str, tuple[float, float]], key: str, digits: int = 3) -> str:
    if key not in summary_row:
        return "-"
    mean, std = summary_row[key]
    return f"{mean:.{digits}f} (1 seed)" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def plot(summary: dict[str, dict[str, tuple[float, float]]], path: Path) -> None:
    """Bar chart of linear-probe accuracy, Dice and kNN accuracy per method, with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in summary if "dice" in summary[name]]
    keys = (("knn", "kNN accuracy"), ("probe", "linear-probe accuracy"), ("dice", "fine-tuned Dice"))
    positions = np.arange(len(names))
    width = 0.27
    figure, axes = plt.subplots(figsize=(11, 4.5))
    for offset, (key, label) in zip((-width, 0, width), keys):
        axes.bar(positions + offset, [summary[n][key][0] for n in names], width,
                 yerr=[np.nan_to_num(summary[n][key][1]) for n in names], label=label, capsize=2)
    axes.set_xticks(positions, names, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("score (test split)")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _missing_seeds(settings: StudySettings, seeds_held: dict[str, list[int]]) -> str:
    """``" planned (**held**: ...)"`` naming the seeds each row holds when a row (other than the one-seed ceiling) lacks a
    planned seed, rows with the same seeds together; empty when every row holds every seed."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, seeds in seeds_held.items():
        if name != CEILING:
            groups.setdefault(tuple(seeds), []).append(name)
    if all(seeds == tuple(settings.seeds) for seeds in groups):
        return ""
    return " planned (**held**: " + "; ".join(
        f"{', '.join(map(str, seeds))} for {', '.join(names) if len(groups) > 1 else 'every row'}"
        for seeds, names in groups.items()) + ")"


def report(summary: dict[str, dict[str, tuple[float, float]]], settings: StudySettings, command: str,
           wall_seconds: float, plot_path: Path, seeds_held: dict[str, list[int]] | None = None) -> str:
    """The Markdown report; ``seeds_held`` (row -> seeds it holds) is shown where a row lacks a planned seed."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    header = ("| method | kNN acc. (k=20) | linear probe acc. | fine-tuned Dice | mean of probe and Dice | "
              "pretraining s / iteration |\n|---|---|---|---|---|---|")
    lines = [header]
    for name, row in summary.items():
        lines.append(f"| {name} | {_cell(row, 'knn')} | {_cell(row, 'probe' if name != CEILING else 'supervised')} | "
                     f"{_cell(row, 'dice')} | {_cell(row, 'score')} | {_cell(row, 'seconds_per_iteration', 2)} |")
    signal = ["| method | effective rank (features, evaluated split) | match accuracy | zero-gradient steps | "
              "non-zero IMLE entries | edge / vertex gradient |\n|---|---|---|---|---|---|"]
    for name, row in summary.items():
        if name != CEILING:
            signal.append(f"| {name} | {_cell(row, 'effective_rank', 1)} | " + " | ".join(
                _cell(row, key) for key in SIGNAL_STATISTICS) + " |")
    b = settings.benchmark
    # a report of tuning trials only has no row the goal compares: it gets its own title and no goal
    tuning = not {row.name for row in study_rows()} & set(summary)
    title = (f"# Study v2: tuning trials ({settings.evaluation_split} split)" if tuning else
             "# LVM-Med against its ablations and standard SSL objectives")
    goal = [] if tuning else ["## Goal", "", *[f"- {line}" for line in verdict(summary)], ""]
    text = [
        title, "",
        "Written by `python -m benchmarks.ssl_study` (`benchmarks/ssl_study.py`; method in its docstring).", "",
        f"- command: `{command}`", f"- machine: {device}, torch {torch.__version__}, Python {platform.python_version()}; "
        f"time {wall_seconds / 60:.1f} min (wall time of each process, summed over merged records)",
        f"- encoder: {settings.encoder} (3-channel input, {settings.image_size} x {settings.image_size} views and "
        "images); U-Net: " + ("`ResNet50UNet`" if settings.encoder == "resnet50" else f"MONAI `FlexibleUNet` on {settings.encoder}"),
        f"- pretraining: {settings.pretrain_iterations} iterations for every row ({settings.pretrain_epochs} epochs of "
        f"{settings.iterations_per_epoch}), batch {settings.batch_size}, `configs/pretrain.json` otherwise as is",
        f"- linear probe: {settings.probe_epochs} epochs of `configs/train_cls.json` (batch 16, learning rate "
        f"{settings.probe_learning_rate:g}); supervised ceiling: {settings.ceiling_epochs} epochs of the same config "
        "fine-tuning the whole encoder on the training split and the labelled pool (learning rate 1e-3, first seed "
        "only); U-Net: "
        f"{settings.segmentation_epochs} epochs of `configs/train.json` (batch 16); kNN k=20, t=0.1",
        f"- seeds: {', '.join(map(str, settings.seeds))}{_missing_seeds(settings, seeds_held or {})}; evaluated on the "
        f"**{settings.evaluation_split}** split; mean ± sample std over the seeds held",
        f"- data: `scripts/data/ssl_benchmark.py`, pool {b.pool_per_modality} generated images per modality (5) plus "
        f"the pydicom/nibabel real images; {b.training_per_group}/{b.validation_per_group}/{b.test_per_group} "
        "labelled images per (modality, shape class) pair for training/validation/test (20 pairs)",
        *([f"- lambda rows: `LVMMedLoss`'s default lambda_ = {default_lambda():g} divided and multiplied by 10"]
          if any(name.startswith("lambda") for name in summary) else []),
        f"- feature maps: {settings.encoder} of output stride {settings.output_stride}: "
        f"{-(-settings.image_size // settings.output_stride)} x {-(-settings.image_size // settings.output_stride)} cells"
        f" at {settings.image_size} px; pool: " + ("independent images" if b.slices_per_volume == 1 else
                                                   f"volumes of {b.slices_per_volume} near-duplicate slices"),
        "", "## Results", "", *lines, "", "Learning signal (last pretraining epoch; `ObjectiveStats`):", "", *signal, "", f"![scores per method]({plot_path.name})", "", *goal,
    ]
    return "\n".join(text)


def _read_record(path: Path, settings: StudySettings, use: str) -> tuple[dict[str, dict[str, dict[str, float]]], float]:
    """The (row, seed) figures and the seconds of a study's ``.json`` record, which must hold ``settings``' study
    (``use``, "resumed" or "merged", names what is refused otherwise)."""
    saved = json.loads(path.read_text())
    if saved.get("settings") != repr(settings):
        raise ValueError(f"{path} holds a study with other settings ({saved.get('settings')}); not {use}.")
    return saved["runs"], float(saved["seconds"])


def _save_record(path: Path, settings: StudySettings, runs: dict[str, dict[str, dict[str, float]]],
                 seconds: float) -> None:
    """Writes the study's record atomically: its settings, seconds so far and (row, seed) figures."""
    state = {"settings": repr(settings), "seconds": seconds, "runs": runs}
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(state, indent=1)))


def run_study(settings: StudySettings, data_root: Path, output: Path | None, command: str,
              rows: Sequence[Row] | None = None, with_ceiling: bool = True,
              resume: bool = False, merge: Sequence[Path] = (),
              report_only: bool = False) -> dict[str, dict[str, tuple[float, float]]]:
    """Runs every row over every seed (seed by seed, so that a cut-short run has every row at its first seeds) and
    returns the summary. With ``output``, each (row, seed)'s figures are saved to ``output.json`` as they come, and
    the report and its plot are written at the end; ``resume`` keeps the (row, seed) pairs that file already holds
    (it must come from the same settings), so an interrupted study continues where it stopped. ``merge`` adds the
    (row, seed) pairs of other studies' ``.json`` records of the same settings (e.g. rows run in parallel processes)
    and their time; a pair in two records must hold the same figures. ``report_only`` runs nothing: the report of
    the pairs held so far (a study cut short, its missing seeds to come with ``resume``).
    """
    start = time.perf_counter()
    paths = prepare_ssl_benchmark(data_root, settings.benchmark)
    rows = list(rows) if rows is not None else study_rows()
    record = output.with_suffix(".json") if output is not None else None
    runs: dict[str, dict[str, dict[str, float]]] = {}
    seconds_before = 0.0
    if resume and record is not None and record.is_file():
        runs, seconds_before = _read_record(record, settings, "resumed")
    for other in merge:
        other_runs, other_seconds = _read_record(Path(other), settings, "merged")
        for name, seeds in other_runs.items():
            for seed, figures in seeds.items():
                if runs.get(name, {}).get(seed, figures) != figures:
                    raise ValueError(f"{other} holds other figures for {name!r}, seed {seed}; not merged.")
                runs.setdefault(name, {})[seed] = figures
        seconds_before += other_seconds
    if merge and record is not None:
        _save_record(record, settings, runs, seconds_before)
    tasks: list[tuple[Row | None, int]] = [] if report_only else [(row, seed) for seed in settings.seeds for row in rows]
    # the ceiling is one seed: it costs several rows
    tasks += [(None, settings.seeds[0])] if with_ceiling and not report_only else []
    for row, seed in tasks:
        name = row.name if row is not None else CEILING
        if str(seed) in runs.get(name, {}):
            continue
        began = time.perf_counter()
        figures = run_row(row, seed, settings, paths) if row is not None else run_ceiling(seed, settings, paths)
        runs.setdefault(name, {})[str(seed)] = figures
        logger.info("%s, seed %d: %s (%.0f s)", name, seed, figures, time.perf_counter() - began)
        if record is not None:
            _save_record(record, settings, runs, seconds_before + time.perf_counter() - start)
    order = [row.name for row in [*study_rows(), *tuning_rows()]] + [CEILING]
    results = {name: [runs[name][key] for key in sorted(runs[name], key=int)] for name in order if name in runs}
    summary = summarise(results)
    if output is not None:
        plot_path = output.with_suffix(".png")
        plot(summary, plot_path)
        wall = seconds_before + time.perf_counter() - start
        held = {name: sorted(map(int, runs[name])) for name in results}
        output.write_text(report(summary, settings, command, wall, plot_path, held), encoding="utf-8")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every row at tiny sizes (the test suite's run)")
    parser.add_argument("--preset", choices=("v2", "v1"), default="v2",
                        help="v2 (default): 4 x 4 feature maps, 150 iterations, 640 test images; v1: the first study's")
    parser.add_argument("--slices-per-volume", type=int, default=None,
                        help="pretraining pool of volumes of this many near-duplicate slices (the second-order case)")
    parser.add_argument("--tune", action="store_true",
                        help="run the tuning trials of every method (TUNING_TRIALS) on the validation split")
    parser.add_argument("--encoder", choices=ENCODERS, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--pretrain-epochs", type=int, default=None)
    parser.add_argument("--iterations-per-epoch", type=int, default=None)
    parser.add_argument("--probe-epochs", type=int, default=None)
    parser.add_argument("--segmentation-epochs", type=int, default=None)
    parser.add_argument("--ceiling-epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--split", choices=("validation", "test"), default=None,
                        help="evaluated split (tune on validation, report on test)")
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows (names as in the report)")
    parser.add_argument("--data-root", type=Path, default=None, help="benchmark folder (default data/ssl_benchmark[_quick])")
    parser.add_argument("--output", type=Path, default=None, help="Markdown report, e.g. docs/ssl_study.md")
    parser.add_argument("--resume", action="store_true", help="keep the (row, seed) results already in the output's .json")
    parser.add_argument("--merge", type=Path, nargs="+", default=(),
                        help="add the (row, seed) results of these .json records of the same settings (rows run in "
                             "parallel processes), then run what is missing")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the report of the (row, seed) results held (with --resume/--merge)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else (V2 if args.preset == "v2" else StudySettings())
    if args.slices_per_volume is not None:
        base = StudySettings(**{**base.__dict__, "benchmark": BenchmarkSizes(
            **{**base.benchmark.__dict__, "slices_per_volume": args.slices_per_volume})})
    if args.tune:
        if args.split == "test":
            raise SystemExit("--tune chooses settings: it reads the validation split, not --split test.")
        args.split = "validation"
    chosen = {
        "encoder": args.encoder, "image_size": args.image_size, "batch_size": args.batch_size,
        "pretrain_epochs": args.pretrain_epochs,
        "iterations_per_epoch": args.iterations_per_epoch, "probe_epochs": args.probe_epochs,
        "segmentation_epochs": args.segmentation_epochs, "ceiling_epochs": args.ceiling_epochs, "seeds": tuple(args.seeds) if args.seeds else None,
        "evaluation_split": args.split,
    }
    settings = StudySettings(**{**base.__dict__, **{key: value for key, value in chosen.items() if value is not None}})
    rows = tuning_rows() if args.tune else study_rows()
    if args.rows:
        unknown = sorted(set(args.rows) - {row.name for row in rows} - {CEILING})
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; known: {[row.name for row in rows]}")
        rows = [row for row in rows if row.name in args.rows]
    sizes = settings.benchmark
    data_root = args.data_root or REPOSITORY / "data" / (
        f"ssl_benchmark_{'quick' if args.quick else args.preset}"
        + (f"_slices{sizes.slices_per_volume}" if sizes.slices_per_volume > 1 else ""))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    summary = run_study(settings, data_root, args.output, "python -m benchmarks.ssl_study " + shlex.join(sys.argv[1:] if argv is None else argv),
                        rows, with_ceiling=not args.tune and (not args.rows or CEILING in args.rows), resume=args.resume,
                        merge=args.merge, report_only=args.report_only)
    for name, row in summary.items():
        print(f"{name:34s} " + "  ".join(f"{key} {_cell(row, key)}" for key in ("knn", "probe", "supervised", "dice", "score", "effective_rank", *SIGNAL_STATISTICS, "seconds_per_iteration") if key in row))


if __name__ == "__main__":
    main()

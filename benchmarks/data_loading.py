"""Does data loading keep up with pretraining? Loader throughput vs step rate, from ``configs/pretrain.json``.

``python -m benchmarks.data_loading [--quick] [--image-size N] [--augmentation batched|per_sample]`` parses the
bundle config as ``monai.bundle run`` does (the embedded data under a temporary ``data_root``), and measures in
one run:

- the loader: batches per second of ``train#dataloader`` followed by the trainer's ``train#prepare_batch``
  (batched path: cached fixed-size sources, then ``BatchTwoViewAugment`` on the training device; per-sample
  path: ``TwoViewAugmentd`` in the dataset), with the config's ``num_workers``, shuffling, modality balancing
  and cache, over whole epochs, worker start-up included;
- the step: the config's ``network`` (encoder, projector and ``LVMMedLoss``) and ``optimizer``, one
  forward, backward and optimizer step on a batch already loaded;

in rounds of one epoch and one step, medians over the rounds.

Target (issue 7): loader throughput >= 2x the step rate. With ``num_workers`` 0 the loader runs in the
training process, between steps: its time adds to each step even when the target is met.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from benchmarks.common import Report, Table, Target, default_device, machine_summary, synchronize

__all__ = ["run"]

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain.json"
THROUGHPUT_TARGET = 2.0


def _parser(data_root: Path, overrides: dict[str, object]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update({"bundle_root": str(CONFIG.parents[1]), "data_root": str(data_root), **overrides})
    return parser


def _loader_seconds(
    loader: torch.utils.data.DataLoader, prepare: Callable, device: torch.device, max_batches: int | None
) -> tuple[float, int]:
    """(seconds per batch over one epoch or its first ``max_batches``, worker start-up and ``prepare`` on
    ``device`` included; batches)."""
    batches = 0
    start = time.perf_counter()
    for batch in loader:
        prepare(batch, device)
        batches += 1
        if batches == max_batches:
            break
    synchronize(device)
    return (time.perf_counter() - start) / batches, batches


class _TrainingStep:
    """One training step of the config's network and optimizer (forward, backward, optimizer) on a loaded batch."""

    def __init__(self, parser: ConfigParser, device: torch.device) -> None:
        self.network = parser.get_parsed_content("network")
        self.optimizer = parser.get_parsed_content("optimizer")
        self.device = device
        self.network.train()

    def __call__(self, prepared: tuple) -> float:
        view1, _, others, _ = prepared
        synchronize(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.network(view1, *others).backward()
        self.optimizer.step()
        synchronize(self.device)
        return time.perf_counter() - start


def run(
    quick: bool = False, image_size: int | None = None, data_root: Path | None = None, repeats: int = 3,
    augmentation: str | None = None,
) -> Report:
    """Measures loader and step rates at the config's settings (``quick``: 32 x 32 views, batch 8; ``augmentation``
    overrides the config's path)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = default_device()
    overrides: dict[str, object] = {}
    if quick:
        overrides.update(image_size=32, batch_size=8)
        repeats = 1
    if image_size is not None:
        overrides["image_size"] = image_size
    if augmentation is not None:
        overrides["augmentation"] = augmentation
    with tempfile.TemporaryDirectory() as temporary:
        parser = _parser(data_root or Path(temporary) / "data", overrides)
        settings = {key: parser.get_parsed_content(key)
                    for key in ("image_size", "batch_size", "num_workers", "augmentation", "cache_rate")}
        loader = parser.get_parsed_content("train#dataloader")
        dataset = parser.get_parsed_content("train#slices")
        prepare = parser.get_parsed_content("train#prepare_batch")
        step_once = _TrainingStep(parser, device)
        prepared = prepare(next(iter(loader)), device)
        step_once(prepared)  # warm-up
        # rounds of one loader epoch then one step, so that both see the same load of the machine
        loader_times, step_times, seen = [], [], 0
        for _ in range(repeats):
            seconds, batches = _loader_seconds(loader, prepare, device, max_batches=3 if quick else None)
            loader_times.append(seconds)
            seen += batches
            step_times.append(step_once(prepared))
        loader_rate, step = 1.0 / statistics.median(loader_times), statistics.median(step_times)
    step_rate = 1.0 / step
    ratio = loader_rate / step_rate
    describe = (f"{settings['augmentation']} augmentation, image {settings['image_size']}x{settings['image_size']}, "
                f"batch {settings['batch_size']}, num_workers {settings['num_workers']}, cache_rate "
                f"{settings['cache_rate']}, volume cache {dataset.cache_size}, "
                f"{len(dataset)} slices")
    report = Report(f"Data loading vs step rate ({describe})")
    report.notes.append(f"machine: {machine_summary(device)}")
    table = Table("configs/pretrain.json, embedded data", ["measure", "value"])
    table.add(f"loader + prepare_batch batches/s (median of {repeats} epochs, {seen} batches; worker start-up "
              "included)",
              f"{loader_rate:.2f}")
    table.add("loader seconds per batch", f"{1 / loader_rate:.3f}")
    table.add(f"training step seconds (median of {repeats}, interleaved with the epochs)", f"{step:.3f}")
    table.add("step rate, steps/s", f"{step_rate:.3f}")
    table.add("loader throughput / step rate", f"{ratio:.1f}x")
    if settings["num_workers"] == 0:
        table.add("loading time added to each step (num_workers 0)", f"{(1 / loader_rate) / step:.1%}")
    report.tables.append(table)
    report.targets.append(Target(
        f"loader throughput vs step rate ({device.type}, image {settings['image_size']})", f"{ratio:.1f}x",
        f">= {THROUGHPUT_TARGET:g}x", None if quick else ratio >= THROUGHPUT_TARGET,
    ))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--image-size", type=int, default=None, help="override the config's image_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--augmentation", choices=("batched", "per_sample"), default=None,
                        help="override the config's augmentation path")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(run(args.quick, args.image_size, repeats=args.repeats, augmentation=args.augmentation).render())


if __name__ == "__main__":
    main()

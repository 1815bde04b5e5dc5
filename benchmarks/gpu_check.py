"""Every CUDA figure of the bundle in one command of at most 8 minutes (issue 23).

``python -m benchmarks.gpu_check [--quick] [--device cuda|cpu] [--output DIR] [--budget-s S]`` runs, in one
process, the parts below in order, printing each part's tables as it completes and writing
``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` after every part (a run cut short keeps what it measured):

0. ``warm-up``: the CUDA context and the numba solver's first call (compiled, or loaded from numba's cache), so
   that no figure holds them.
1. ``pretrain``: ``configs/pretrain.json`` as users run it (``PretrainModel``, ``SupervisedTrainer``, batched
   augmentation in ``prepare_batch`` on the device, AMP on CUDA), ResNet-50 at 224², batch 2 x 64, graph size
   16, 50 iterations after a warm-up, interleaved with the same run on the NT-Xent baseline
   (``benchmarks.demo_share``): seconds per iteration, the objective's share of the step (target <= 10 %), peak
   memory, and whether the loss and every statistic the objective exposes (its ``last_*`` attributes, the
   per-path gradient norms among them, and the per-epoch metrics of ``ObjectiveStats``) stay finite.
2. ``synchronisations``: device-to-host synchronisations and top-level operator calls of one objective step
   (``benchmarks.objective_profile``, targets <= 5 and <= 300), and the synchronisations of whole training steps
   (profiler events; on CUDA also ``torch.cuda.set_sync_debug_mode("warn")`` warnings, target <= 5).
3. ``augmentation``: two-view augmentation on the device at 224² (batch 256): the batched path (target >= 5,000
   samples/s) and the per-view path side by side (``benchmarks.augmentation.device_rates``).
4. ``pretrain_vit``: ``configs/pretrain_vit.json`` (SAM ViT-B at 1024²): the largest batch (a power of two)
   whose training step fits, then a few iterations of the workflow at that batch: seconds per iteration, peak
   memory.
5. ``inference``: images per second of ``configs/inference.json`` (its ResNet-50 U-Net through its
   ``SliceInferer`` at its ``image_size``) and of the SAM ViT-B encoder at 1024², AMP on CUDA.
6. ``multi_gpu``: with two or more GPUs visible, ``configs/multi_gpu_pretrain.json`` under ``torchrun
   --nproc_per_node`` for 20 iterations, and the same on one GPU: scaling efficiency t(1 GPU) / t(N GPUs) at the
   same batch per GPU.

The time budget (default 480 s, the issue's 8 minutes) is enforced here: each part gets a share of what is
left, stops starting new work at its share's end, and is interrupted (``SIGALRM``) shortly after; a part that
fails or is interrupted is recorded with its error and the next part runs; parts with no time left are
recorded as skipped, saying so. ``--quick`` runs every part at tiny sizes (targets not judged), for the test
suite. On a bare GPU machine run it through ``bash benchmarks/gpu_check.sh`` (see ``docs/performance.md``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROCESS_STARTED = time.perf_counter()  # before the heavy imports below: the budget covers them

import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from benchmarks import augmentation, demo_share, objective_profile
from benchmarks.common import (CONFIGS, Report, Table, Target, build_trainer, interleaved_medians, load_average,
                               machine_summary, synchronize)
from scripts.atomic_save import write_atomically
from scripts.objective.lvmmed_loss import LVMMedLoss

__all__ = ["PARTS", "SCHEMA", "Check", "PartResult", "objective_statistics", "run_check"]

DEFAULT_BUDGET_S = 480.0
GRACE_S = 20.0  # how long a part may overrun its share before it is interrupted
SYNC_TARGET = 5
VIT_BATCHES = (2, 4, 8, 16, 32, 64, 128)
# --quick: every workflow's encoder is this two-block SAM ViT at 32² (a ResNet-50 takes seconds to build on a CPU)
QUICK_ENCODER = {"_target_": "scripts.networks.sam_vit.sam_vit_b", "img_size": "@image_size", "embed_dim": 32,
                 "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "window_size": 2}
QUICK_SIZES = {"image_size": 32, "batch_size": 8, "num_workers": 0, "cache_rate": 0.0, "encoder": QUICK_ENCODER}
SCHEMA_VERSION = 1
STATUSES = ("done", "failed", "cut", "skipped")


class Skipped(Exception):
    """A part that does not apply here (the message says why)."""


class OutOfTime(BaseException):
    """Raised by the SIGALRM handler when a part overruns its share of the budget (a BaseException, so that the
    workflow's own ``except Exception`` handlers do not swallow it)."""


@dataclass
class Context:
    """What every part gets: the device, the size setting, a scratch folder and the part's deadline."""

    device: torch.device
    quick: bool
    scratch: Path
    deadline: float = math.inf

    @property
    def data(self) -> Path:
        """The embedded data, written once under the scratch folder and read by every workflow."""
        return self.scratch / "data"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def judged(self) -> bool:
        """Whether targets get a verdict: the full sizes on CUDA."""
        return self.cuda and not self.quick

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def verdict(self, met: bool) -> bool | None:
        return met if self.judged else None


@dataclass
class PartResult:
    """One part's outcome: its status and its report (tables, targets, notes and figures)."""

    name: str
    title: str
    status: str = "skipped"
    seconds: float = 0.0
    reason: str | None = None
    report: Report | None = None

    def as_json(self) -> dict[str, Any]:
        report = self.report or Report(self.title)
        return {
            "name": self.name,
            "title": self.title,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "reason": self.reason,
            "figures": {key: _json_number(value) for key, value in report.figures.items()},
            "targets": [{"name": t.name, "measured": t.measured, "threshold": t.threshold, "met": t.met,
                         "verdict": t.verdict} for t in report.targets],
            "tables": [{"title": t.title, "columns": list(t.columns), "rows": [list(r) for r in t.rows]}
                       for t in report.tables],
            "notes": list(report.notes),
        }

    def render(self) -> str:
        head = f"## {self.name}: {self.title}\n\nstatus: **{self.status}** ({self.seconds:.1f} s)"
        if self.reason:
            head += f" - {self.reason}"
        body = self.report.render().split("\n", 2)[-1] if self.report else ""
        return head + "\n\n" + body


def _json_number(value: object) -> object:
    """NaN and infinities as strings (JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# --- helpers -------------------------------------------------------------------------------------------------


def _device_override(device: torch.device) -> dict[str, object]:
    """Config overrides that put a bundle workflow on ``device`` (AMP on CUDA, as the configs do there)."""
    return {"device": f"$torch.device({str(device)!r})", "train#trainer#amp": device.type == "cuda"}


def _flatten(name: str, value: object, into: dict[str, torch.Tensor | float]) -> None:
    """Numbers and one-element tensors under ``name``; mappings of them under ``name.key``; anything else left out.
    Tensors stay tensors (detached copies): reading them would synchronise the device."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{name}.{key}", item, into)
    elif isinstance(value, torch.Tensor) and value.numel() == 1:
        into[name] = value.detach().reshape(()).clone()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        into[name] = float(value)


def _statistic_values(objective: torch.nn.Module) -> dict[str, torch.Tensor | float]:
    values: dict[str, torch.Tensor | float] = {}
    for name in dir(objective):
        if name.startswith("last_"):
            try:
                value = getattr(objective, name)
            except (AttributeError, RuntimeError):  # a statistic with no step behind it yet
                continue
            _flatten(name.removeprefix("last_"), value, values)
    return values


def objective_statistics(objective: torch.nn.Module) -> dict[str, float]:
    """Every numeric statistic an objective exposes for its last step: its attributes named ``last_*`` (numbers,
    one-element tensors, or mappings of them, flattened as ``name.key``), without the prefix. Read generically,
    so that statistics the objective gains (the per-path gradient norms) appear without a change here. NaN is
    the objective's "no value on this step" (``ObjectiveStats`` does not count it)."""
    return {name: float(value) for name, value in _statistic_values(objective).items()}


def _numeric(metrics: Mapping[str, object]) -> dict[str, float]:
    values: dict[str, torch.Tensor | float] = {}
    for name, value in metrics.items():
        _flatten(name, value, values)
    return {name: float(value) for name, value in values.items()}


def _verdict(met: bool | None) -> str:
    return "not judged" if met is None else "met" if met else "not met"


def _megabytes(count: float) -> float:
    return round(count / 2**20, 1)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _stop_after(trainer: Engine, iterations: int) -> Callable[[], None]:
    """Interrupts ``trainer`` after ``iterations`` more iterations per ``run()``; returns a function that
    detaches the handler. Resuming with ``run()`` continues (Ignite's interrupt / resume)."""
    state = {"done": 0}

    def count(engine: Engine) -> None:
        state["done"] += 1
        if state["done"] >= iterations:
            state["done"] = 0
            engine.interrupt()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, count)
    return lambda: trainer.remove_event_handler(count, Events.ITERATION_COMPLETED)


def _end(trainer: Engine) -> None:
    """Ends an interrupted run without its ``COMPLETED`` handlers (final checkpoint, encoder export)."""
    trainer.terminate(skip_completed=True)
    trainer.run()


@contextmanager
def _iteration_timer(trainer: Engine, device: torch.device) -> Iterator[list[float]]:
    """Seconds of each iteration of ``trainer`` run inside the block: between consecutive ``ITERATION_COMPLETED``
    (the first from entering the block; the device synchronised at each)."""
    times: list[float] = []
    synchronize(device)
    last = [time.perf_counter()]

    def completed(engine: Engine) -> None:
        synchronize(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    trainer.add_event_handler(Events.ITERATION_COMPLETED, completed)
    try:
        yield times
    finally:
        trainer.remove_event_handler(completed, Events.ITERATION_COMPLETED)


class _PeakPerIteration:
    """CUDA allocator peak of each iteration (reset at ``ITERATION_STARTED``; no synchronisation)."""

    def __init__(self, trainer: Engine, device: torch.device) -> None:
        self.device = device
        self.peaks: list[int] = []
        if device.type == "cuda":
            trainer.add_event_handler(Events.ITERATION_STARTED, self._reset)
            trainer.add_event_handler(Events.ITERATION_COMPLETED, self._record)

    def _reset(self, engine: Engine) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def _record(self, engine: Engine) -> None:
        self.peaks.append(torch.cuda.max_memory_allocated(self.device))

    @property
    def peak_mb(self) -> float | None:
        return _megabytes(max(self.peaks)) if self.peaks else None


# --- the parts -----------------------------------------------------------------------------------------------


def part_warm_up(context: Context, result: PartResult) -> Report:
    """The CUDA context and the numba solver's first call, timed apart."""
    report = Report(result.title)
    started = time.perf_counter()
    torch.zeros(1, device=context.device).add_(1)
    synchronize(context.device)
    report.figures["device_init_s"] = round(time.perf_counter() - started, 3)
    setting = objective_profile.ProfileSetting(graphs=2, channels=64, cells=3)
    loss_fn = LVMMedLoss(embedding_dim=setting.embedding_dim, graph_size=setting.graph_size).to(context.device)
    inputs = objective_profile.make_inputs(setting, context.device)
    started = time.perf_counter()
    loss_fn(**inputs).backward()
    synchronize(context.device)
    report.figures["solver_first_step_s"] = round(time.perf_counter() - started, 3)
    table = Table("Warm-up (not part of any figure)", ["what", "seconds"])
    table.add("device initialisation", f"{report.figures['device_init_s']:.2f}")
    table.add("first LVMMedLoss step (numba solver compiled or loaded from its cache)",
              f"{report.figures['solver_first_step_s']:.2f}")
    report.tables.append(table)
    return report


def part_pretrain(context: Context, result: PartResult) -> Report:
    """``configs/pretrain.json`` at 224², batch 2 x 64, LVM-Med and NT-Xent interleaved (benchmarks.demo_share)."""
    if context.quick:
        overrides: dict[str, object] = dict(QUICK_SIZES)
        iterations, blocks, warmup = 2, 1, 1
    else:
        overrides = {"image_size": 224, "batch_size": 64}
        iterations, blocks, warmup = 10, 5, 3
    overrides.update({"loss#graph_size": 16, "monitor_interval": None, "data_root": str(context.data)})
    peaks: dict[str, _PeakPerIteration] = {}
    losses: dict[str, list[torch.Tensor]] = {}
    per_step: list[dict[str, torch.Tensor | float]] = []  # LVM-Med's statistics after each iteration
    metrics: dict[str, dict[str, float]] = {}

    def on_trainer(name: str, trainer: Engine) -> None:
        peaks[name] = _PeakPerIteration(trainer, context.device)
        losses[name] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                  lambda engine: losses[name].append(engine.state.output["loss"].detach()))
        if name == "LVM-Med":
            objective = trainer.network.objective
            trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                      lambda engine: per_step.append(_statistic_values(objective)))

    def after_block(name: str, trainer: Engine) -> None:
        metrics[name] = _numeric(trainer.state.metrics)

    # each block is 2 x iterations; stop starting blocks when less than ~1.5 blocks of the share are left
    measured = demo_share.measure(overrides, iterations, blocks, warmup, context.device,
                                  deadline=context.deadline - 30.0, on_trainer=on_trainer, after_block=after_block)
    report = demo_share.share_report(measured, judged=context.judged)
    report.name = result.title
    for name in measured.records:
        key = name.lower().replace("-", "")
        report.figures[f"{key}_s_per_iteration"] = round(measured.median(name), 4)
        report.figures[f"{key}_iterations_timed"] = len(measured.records[name])
        report.figures[f"{key}_peak_memory_mb"] = peaks[name].peak_mb
    report.figures["objective_share"] = round(measured.share, 4)
    report.figures["warmup_s"] = round(sum(measured.warmup_seconds.values()), 2)
    finite, loss_values = {}, {}
    for name, values in losses.items():
        stacked = torch.stack([value.float().reshape(()) for value in values])  # one read of the device
        finite[name] = bool(torch.isfinite(stacked).all())
        loss_values[name] = stacked.tolist()
        key = name.lower().replace("-", "")
        report.figures[f"{key}_loss_first"] = loss_values[name][0]
        report.figures[f"{key}_loss_last"] = loss_values[name][-1]
    recorded: dict[str, list[float]] = {}
    for step in per_step:
        for key, value in step.items():
            recorded.setdefault(key, []).append(float(value))
    for key, value in metrics.get("LVM-Med", {}).items():
        recorded[f"epoch mean {key}"] = [value]
    table = Table("Loss and peak memory of both sides, LVM-Med's objective statistics, at every iteration (warm-up "
                  "included; NaN, the objective's \"no value on this step\", not counted), and ObjectiveStats' last "
                  "epoch means",
                  ["quantity", "steps with a value", "min", "mean", "max", "finite"])
    for name in measured.records:
        values = loss_values[name]
        table.add(f"{name} loss", len(values), f"{min(values):.4g}", f"{statistics.fmean(values):.4g}",
                  f"{max(values):.4g}", finite[name])
        megabytes = [_megabytes(peak) for peak in peaks[name].peaks]
        if megabytes:
            table.add(f"{name} peak memory per iteration (CUDA allocator, MB)", len(megabytes), f"{min(megabytes):,.0f}",
                      f"{statistics.fmean(megabytes):,.0f}", f"{max(megabytes):,.0f}", "-")
    finite_statistics, gradient_norms = {}, {}
    for key, values in sorted(recorded.items()):
        present = [value for value in values if not math.isnan(value)]
        ok = all(math.isfinite(value) for value in present)
        finite_statistics[key] = ok
        if present:
            table.add(key, f"{len(present)} of {len(values)}", f"{min(present):.4g}", f"{statistics.fmean(present):.4g}",
                      f"{max(present):.4g}", ok)
            report.figures[f"statistic {key}"] = statistics.fmean(present)
        else:
            table.add(key, f"0 of {len(values)}", "-", "-", "-", "-")
        if "grad" in key and "norm" in key:
            gradient_norms[key] = (len(present), ok)
    report.tables.append(table)
    report.notes.append("peak memory: the CUDA allocator's peak within each iteration, of all it holds (both "
                        "trainers' weights and optimizer states included); the check's own readers of the loss and "
                        "statistics are handlers of each iteration (timed in the breakdown above)")
    report.targets.append(Target("loss finite at every iteration (both objectives, warm-up included)", str(finite),
                                 "all True", all(finite.values())))
    if gradient_norms:
        report.targets.append(Target(
            "per-path gradient norms finite on every step that recorded them",
            ", ".join(f"{key}: {count} steps" for key, (count, _) in sorted(gradient_norms.items())), "all finite",
            all(count > 0 and ok for count, ok in gradient_norms.values())))
    else:
        report.targets.append(Target("per-path gradient norms finite", "the objective exposes no gradient norm",
                                     "all finite", None))
    report.targets.append(Target("objective statistics finite", f"{len(finite_statistics)} statistics", "all finite",
                                 all(finite_statistics.values())))
    return report


def part_synchronisations(context: Context, result: PartResult) -> Report:
    """Synchronisations and operator calls of an objective step (benchmarks.objective_profile) and the
    synchronisations of whole training steps of configs/pretrain.json."""
    report = objective_profile.run(quick=context.quick, repeats=1 if context.quick else 3, encoder_repeats=0,
                                   device=context.device)
    report.name = result.title
    for target in report.targets:  # the objective's targets are judged on the device only (as the issue asks)
        if not context.judged:
            target.met = None
    report.figures = {f"objective_{name}": value for name, value in report.figures.items()}

    overrides: dict[str, object] = {**_device_override(context.device), "monitor_interval": None,
                                    "num_workers": 0 if context.quick else 2, "data_root": str(context.data)}
    if context.quick:
        overrides.update(QUICK_SIZES)
    steps = 2 if context.quick else 3
    with tempfile.TemporaryDirectory(dir=context.scratch) as temporary:
        _, trainer = build_trainer(Path(temporary), "syncs", overrides)
        detach = _stop_after(trainer, 1 if context.quick else 2)
        trainer.run()  # warm-up: Events.STARTED, the first batches and solver calls
        detach()
        detach = _stop_after(trainer, steps)
        synchronize(context.device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities) as profiler:
            trainer.run()
            synchronize(context.device)
        counts = objective_profile.count_events(list(profiler.events()))
        per_step = counts.syncs / steps
        warnings_per_step = None
        if context.cuda:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    trainer.run()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            warnings_per_step = sum("synchroniz" in str(w.message) for w in caught) / steps
        detach()
        _end(trainer)
    names = ", ".join(f"{name} {count}" for name, count in counts.sync_names.most_common()) or "none"
    step_table = Table(f"Whole training steps of configs/pretrain.json ({steps} steps, all handlers), "
                       f"{context.device.type}", ["quantity", "per step", "target", "verdict"])
    step_table.add("profiler events item, _local_scalar_dense, nonzero (also counts reads of CPU tensors, "
                   "which are no synchronisation)", f"{per_step:g}", "-", "-")
    report.figures["training_step_sync_events"] = per_step
    if warnings_per_step is not None:
        step_table.add("set_sync_debug_mode('warn') warnings", f"{warnings_per_step:g}", f"<= {SYNC_TARGET}",
                       _verdict(context.verdict(warnings_per_step <= SYNC_TARGET)))
        report.figures["training_step_sync_warnings"] = warnings_per_step
    report.tables.append(step_table)
    report.notes.append(f"synchronising events of the training steps: {names}")
    report.targets.append(Target(
        "device-to-host synchronisations per training step (whole workflow, set_sync_debug_mode)",
        "not measured on the CPU" if warnings_per_step is None else f"{warnings_per_step:g}", f"<= {SYNC_TARGET}",
        None if warnings_per_step is None else context.verdict(warnings_per_step <= SYNC_TARGET)))
    return report


def part_augmentation(context: Context, result: PartResult) -> Report:
    """Batched vs per-view two-view augmentation on the device (benchmarks.augmentation.device_rates)."""
    view, source, batch, repeats = (32, 64, 4, 1) if context.quick else (224, 256, augmentation.GPU_BATCH, 5)
    if not context.cuda and not context.quick:
        batch = 16
    report = Report(result.title)
    table = Table(f"Two-view augmentation on {context.device.type}, sources on the device, batch {batch}, "
                  f"interleaved medians of {repeats}", ["view (source)", "channels", "batched samples/s",
                                                        "per-view samples/s", "faster"])
    for channels in (1, 3):
        rates = augmentation.device_rates(view, source, channels, repeats, batch, context.device)
        kind = "grey" if channels == 1 else "colour"
        faster = max(rates, key=rates.get)
        table.add(f"{view}² ({source}²)", channels, f"{rates['batched']:,.0f}", f"{rates['per view']:,.0f}", faster)
        report.figures[f"batched_samples_per_s_{kind}"] = round(rates["batched"], 1)
        report.figures[f"per_view_samples_per_s_{kind}"] = round(rates["per view"], 1)
        report.targets.append(Target(
            f"batched augmentation on {context.device.type}, {view}², {kind}, batch {batch}",
            f"{rates['batched']:,.0f} samples/s", f">= {augmentation.GPU_RATE_TARGET:,.0f} samples/s",
            context.verdict(rates["batched"] >= augmentation.GPU_RATE_TARGET)))
    report.tables.append(table)
    report.notes.append("per view: BatchTwoViewAugment called on one source at a time (its operator calls grow "
                        "with the batch, as in the per-view path tried on the CPU); the faster path on the GPU is "
                        "the one to keep")
    return report


def _vit_overrides(context: Context) -> dict[str, object]:
    overrides: dict[str, object] = {"monitor_interval": None, "cache_rate": 0.0, "data_root": str(context.data),
                                    **_device_override(context.device)}
    if context.quick:
        overrides.update({key: value for key, value in QUICK_SIZES.items() if key != "batch_size"})
    return overrides


def _vit_step_fits(context: Context, batch: int) -> bool:
    """Whether one training step of configs/pretrain_vit.json's model (its network, optimizer, prepare_batch and
    AMP) at ``batch`` fits in the device's memory."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "pretrain.json"), str(CONFIGS / "pretrain_vit.json")])
    parser.update({**_vit_overrides(context), "batch_size": batch})
    network, optimizer = parser.get_parsed_content("network"), parser.get_parsed_content("optimizer")
    prepare = parser.get_parsed_content("train#prepare_batch")
    source = parser.get_parsed_content("source_size")
    images = torch.rand(batch, 1, source, source)
    try:
        view1, _, args, _ = prepare({"image": images}, context.device)
        with torch.autocast(context.device.type, enabled=context.cuda):
            loss = network(view1, *args)
        loss.backward()
        optimizer.step()
        synchronize(context.device)
        return True
    except RuntimeError as error:
        if not _is_out_of_memory(error):
            raise
        return False
    finally:
        del network, optimizer
        _free_memory()


def _vit_workflow(context: Context, batch: int, iterations: int) -> tuple[list[float], float | None, int]:
    """configs/pretrain_vit.json's trainer at ``batch``: one warm-up iteration, then ``iterations`` timed; returns
    the seconds of each, the peak memory (MB, CUDA only) and the image size."""
    overrides = {**_vit_overrides(context), "batch_size": batch}
    with tempfile.TemporaryDirectory(dir=context.scratch) as temporary:
        parser, trainer = build_trainer(Path(temporary), "vit", overrides, ("pretrain.json", "pretrain_vit.json"))
        peaks = _PeakPerIteration(trainer, context.device)
        detach = _stop_after(trainer, 1)
        trainer.run()  # warm-up iteration
        detach()
        detach = _stop_after(trainer, iterations)
        with _iteration_timer(trainer, context.device) as times:
            trainer.run()
        detach()
        _end(trainer)
        return times, peaks.peak_mb, parser.get_parsed_content("image_size")


def part_pretrain_vit(context: Context, result: PartResult) -> Report:
    """configs/pretrain_vit.json: the largest batch that fits, then a few iterations of the workflow."""
    candidates = VIT_BATCHES[:2] if context.quick else VIT_BATCHES if context.cuda else VIT_BATCHES[:1]
    fitting = 0
    tried = []
    for batch in candidates:
        if context.left() < 60 and fitting:
            break
        fits = _vit_step_fits(context, batch)
        tried.append(f"{batch}: {'fits' if fits else 'out of memory'}")
        if not fits:
            break
        fitting = batch
    if not fitting:
        raise RuntimeError(f"no batch fits ({'; '.join(tried)})")
    iterations = 2 if context.quick else 4
    while True:  # the workflow holds a little more than the probe (loader, GradScaler): halved until it fits
        try:
            times, peak, image_size = _vit_workflow(context, fitting, iterations)
            break
        except RuntimeError as error:
            if not _is_out_of_memory(error) or fitting < 4:
                raise
        _free_memory()
        tried.append(f"{fitting} in the workflow: out of memory")
        fitting //= 2
    seconds = statistics.median(times)
    report = Report(result.title)
    report.figures.update(batch_size=fitting, image_size=image_size, s_per_iteration=round(seconds, 4),
                          iterations_timed=len(times), peak_memory_mb=peak)
    table = Table(f"configs/pretrain_vit.json on {context.device.type} (AMP {context.cuda}), image {image_size}²",
                  ["quantity", "value"])
    table.add("batch sizes tried (one training step each)", "; ".join(tried))
    table.add("largest batch that fits (of those tried)", f"2 x {fitting}")
    table.add(f"median s / iteration ({len(times)} iterations after 1 warm-up)", f"{seconds:.3f}")
    table.add("images (both views) / s", f"{2 * fitting / seconds:.1f}")
    table.add("peak memory per iteration (CUDA allocator, MB)", "not measured on the CPU" if peak is None else f"{peak:,.0f}")
    report.tables.append(table)
    report.notes.append("cache_rate 0 (a 2048² source cache of the whole collection would take minutes to build); "
                        "the embedding monitor off; the batches tried are powers of two from 2")
    return report


def part_inference(context: Context, result: PartResult) -> Report:
    """Images per second of configs/inference.json's U-Net (through its SliceInferer) and of SAM ViT-B."""
    report = Report(result.title)
    table = Table(f"Inference on {context.device.type}, torch.inference_mode, AMP {context.cuda}",
                  ["network", "input", "batch", "ms per batch", "images / s"])
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"bundle_root": str(CONFIGS.parent), "device": f"$torch.device({str(context.device)!r})",
                   **({"image_size": 32} if context.quick else {})})
    network = parser.get_parsed_content("network").eval()
    inferer = parser.get_parsed_content("inferer")
    size, channels = parser.get_parsed_content("image_size"), parser.get_parsed_content("in_channels")
    axis = parser.get_parsed_content("slice_axis")
    slices = 2 if context.quick else 64
    shape = [size, size]
    shape.insert(axis, slices)
    volume = torch.rand(1, channels, *shape, device=context.device)

    vit_parser = ConfigParser()
    vit_parser.read_config([str(CONFIGS / "pretrain.json"), str(CONFIGS / "pretrain_vit.json")])
    if context.quick:
        vit_parser.update(_vit_overrides(context))
    encoder = vit_parser.get_parsed_content("encoder").to(context.device).eval()
    vit_size = vit_parser.get_parsed_content("image_size")
    vit_batch = 2 if context.quick else 8
    images = torch.rand(vit_batch, 3, vit_size, vit_size, device=context.device)

    def amp(function: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.autocast(context.device.type, enabled=context.cuda):
                return function()
        return run

    repeats = 1 if context.quick else 5
    with torch.inference_mode():
        seconds = interleaved_medians({"unet": amp(lambda: inferer(volume, network)),
                                       "vit": amp(lambda: encoder(images))},
                                      repeats=repeats, warmup=1, device=context.device)
    architecture = parser.get_parsed_content("architecture")
    table.add(f"configs/inference.json ({architecture}) via its SliceInferer", f"{size}² slices, {channels} channel(s)",
              f"{slices} slices", f"{1e3 * seconds['unet']:.1f}", f"{slices / seconds['unet']:,.1f}")
    table.add("SAM ViT-B encoder (configs/pretrain_vit.json)", f"{vit_size}², 3 channels", vit_batch,
              f"{1e3 * seconds['vit']:.1f}", f"{vit_batch / seconds['vit']:,.1f}")
    report.figures.update(unet_images_per_s=round(slices / seconds["unet"], 2), unet_image_size=size,
                          vit_images_per_s=round(vit_batch / seconds["vit"], 2), vit_image_size=vit_size)
    report.tables.append(table)
    return report


def _ddp_figures(world_size: int, scratch: Path, quick: bool, timeout: float) -> dict[str, float]:
    """One torchrun of this module's ``--ddp-worker`` on ``world_size`` GPUs; the figures rank 0 wrote."""
    output = scratch / f"ddp_{world_size}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
               "-m", "benchmarks.gpu_check", "--ddp-worker", str(output), "--output", str(scratch)]
    if quick:
        command.append("--quick")
    completed = subprocess.run(command, cwd=CONFIGS.parent, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"torchrun with {world_size} process(es) exited {completed.returncode}: " + "\n".join(tail))
    return json.loads(output.read_text())


def ddp_worker(output: Path, scratch: Path, quick: bool) -> None:
    """Under torchrun: configs/multi_gpu_pretrain.json for 20 iterations (5 more as warm-up), rank 0 writing the
    median seconds per iteration to ``output``."""
    device = torch.device("cuda")
    overrides: dict[str, object] = {"monitor_interval": None}
    overrides.update(QUICK_SIZES if quick else {"image_size": 224, "batch_size": 64})
    warmup, iterations = (1, 2) if quick else (5, 20)
    _, trainer = build_trainer(scratch, "multi_gpu", overrides, ("pretrain.json", "multi_gpu_pretrain.json"))
    detach = _stop_after(trainer, warmup)
    trainer.run()
    detach()
    detach = _stop_after(trainer, iterations)
    with _iteration_timer(trainer, device) as times:
        trainer.run()
    detach()
    _end(trainer)
    if torch.distributed.get_rank() == 0:
        figures = {"s_per_iteration": statistics.median(times), "iterations": len(times),
                   "world_size": torch.distributed.get_world_size()}
        write_atomically(output, lambda temporary: temporary.write_text(json.dumps(figures)))
    torch.distributed.destroy_process_group()


def part_multi_gpu(context: Context, result: PartResult) -> Report:
    """configs/multi_gpu_pretrain.json under torchrun on every visible GPU, and on one; weak-scaling efficiency."""
    count = torch.cuda.device_count() if context.cuda else 0
    if count < 2:
        raise Skipped(f"{count} GPU(s) visible: multi-GPU scaling needs at least 2")
    from scripts.data.embedded import prepare_embedded_data

    prepare_embedded_data(context.data)  # once, before the ranks read it
    single = _ddp_figures(1, context.scratch, context.quick, timeout=max(context.left() / 2, 10))
    several = _ddp_figures(count, context.scratch, context.quick, timeout=max(context.left(), 10))
    efficiency = single["s_per_iteration"] / several["s_per_iteration"]
    report = Report(result.title)
    report.figures.update(gpus=count, one_gpu_s_per_iteration=round(single["s_per_iteration"], 4),
                          all_gpus_s_per_iteration=round(several["s_per_iteration"], 4),
                          scaling_efficiency=round(efficiency, 3))
    table = Table("configs/multi_gpu_pretrain.json under torchrun, same batch per GPU",
                  ["GPUs", "median s / iteration", "images / s", "scaling efficiency"])
    batch = 8 if context.quick else 64
    table.add(1, f"{single['s_per_iteration']:.3f}", f"{2 * batch / single['s_per_iteration']:,.0f}", "1.00")
    table.add(count, f"{several['s_per_iteration']:.3f}",
              f"{2 * batch * count / several['s_per_iteration']:,.0f}", f"{efficiency:.2f}")
    report.tables.append(table)
    return report


# (name, title, part, share of what is left of the budget relative to the parts after it; None: as long as it
# takes, within the budget; the warm-up, since an interrupted compile would only move to the next part)
PARTS: tuple[tuple[str, str, Callable[[Context, PartResult], Report], float | None], ...] = (
    ("warm_up", "Warm-up: device and the numba solver's first call", part_warm_up, None),
    ("pretrain", "configs/pretrain.json with AMP: ResNet-50 224², batch 2 x 64, LVM-Med vs NT-Xent", part_pretrain,
     0.34),
    ("synchronisations", "Synchronisations and operator calls per step", part_synchronisations, 0.12),
    ("augmentation", "Two-view augmentation on the device: batched vs per view", part_augmentation, 0.06),
    ("pretrain_vit", "configs/pretrain_vit.json: SAM ViT-B at 1024², largest batch", part_pretrain_vit, 0.2),
    ("inference", "Inference throughput: configs/inference.json U-Net and SAM ViT-B", part_inference, 0.06),
    ("multi_gpu", "configs/multi_gpu_pretrain.json under torchrun: scaling", part_multi_gpu, 0.14),
)


# --- the record ----------------------------------------------------------------------------------------------


def _machine(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    properties = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "summary": machine_summary(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": str(device),
        "gpu_name": properties.name if properties else None,
        "gpu_memory_mb": _megabytes(properties.total_memory) if properties else None,
        "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_cores": os.cpu_count(),
    }


@dataclass
class Check:
    """The record of one run: machine, settings and the parts' results; written as JSON and Markdown."""

    device: torch.device
    quick: bool
    budget_s: float
    output: Path
    started: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    parts: list[PartResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    finished: bool = False
    machine: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "command": "python -m benchmarks.gpu_check" + (" --quick" if self.quick else "")
                       + f" --device {self.device.type} --budget-s {self.budget_s:g}",
            "started": self.started,
            "finished": self.finished,
            "elapsed_s": round(self.elapsed_s, 2),
            "budget_s": self.budget_s,
            "quick": self.quick,
            "machine": self.machine,
            "parts": [part.as_json() for part in self.parts],
        }

    def summary(self) -> Table:
        table = Table("Targets", ["part", "target", "measured", "threshold", "verdict"])
        for part in self.parts:
            if part.report is None or not part.report.targets:
                table.add(part.name, "-", part.status + (f": {part.reason.splitlines()[0]}" if part.reason else ""),
                          "-", "-")
                continue
            for target in part.report.targets:
                table.add(part.name, target.name, target.measured, target.threshold, target.verdict)
        return table

    def render(self) -> str:
        machine = self.machine
        gpu = (f"{machine['gpu_name']} ({machine['gpu_memory_mb']:,.0f} MB), {machine['gpus_visible']} visible"
               if machine.get("gpu_name") else "none used")
        lines = [
            "# GPU check (issue 23)", "",
            f"- command: `{self.as_json()['command']}`",
            f"- started {self.started}, {self.elapsed_s:.0f} s of a {self.budget_s:g} s budget"
            + ("" if self.finished else " (**not finished**: the figures below are what it measured)"),
            f"- GPU: {gpu}",
            f"- torch {machine.get('torch')}, CUDA {machine.get('cuda')}, cuDNN {machine.get('cudnn')}, "
            f"Python {machine.get('python')}",
            f"- machine: {machine.get('summary')}", "",
            self.summary().render(), "",
        ]
        lines += [part.render() for part in self.parts]
        return "\n".join(lines).rstrip() + "\n"

    def write(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.as_json(), indent=2)
        write_atomically(self.output / "gpu_check.json", lambda temporary: temporary.write_text(text))
        markdown = self.render()
        write_atomically(self.output / "gpu_check.md", lambda temporary: temporary.write_text(markdown))


def _alarm(signum: int, frame: object) -> None:
    raise OutOfTime("the part overran its share of the time budget and was interrupted")


def _error_text(error: BaseException) -> str:
    """The error's own line first, then the last frames of its traceback."""
    frames = traceback.format_exception(type(error), error, error.__traceback__)
    tail = "".join(frames[-4:]).strip()
    return f"{type(error).__name__}: {error}".strip() + "\n" + tail


def run_check(
    device: torch.device, quick: bool, output: Path, budget_s: float = DEFAULT_BUDGET_S,
    echo: Callable[[str], None] = print, only: tuple[str, ...] | None = None, started: float | None = None,
) -> Check:
    """Runs the parts in order within ``budget_s`` seconds from ``started`` (a ``time.perf_counter()``; default
    now), writing the record after each (see the module docstring); returns the record."""
    if budget_s <= 0:
        raise ValueError(f"--budget-s must be > 0, got {budget_s}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but torch {torch.__version__} sees no CUDA device")
    names = [name for name, *_ in PARTS]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {names}")
    start = time.perf_counter() if started is None else started
    end = start + budget_s
    check = Check(device, quick, budget_s, output, machine=_machine(device))
    chosen = [part for part in PARTS if only is None or part[0] in only]
    check.parts = [PartResult(name, title, reason="not reached") for name, title, _, _ in chosen]
    check.write()
    echo(f"# GPU check{' (quick)' if quick else ''}: {machine_summary(device)}; budget {budget_s:g} s; writing "
         f"{output / 'gpu_check.json'} and gpu_check.md after every part\n")
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
            for index, (result, (_, _, function, share)) in enumerate(zip(check.parts, chosen)):
                left = end - time.perf_counter()
                weights = sum(part[3] or 0.0 for part in chosen[index:])
                allotted = left if share is None else left * share / weights
                if left < 5:
                    result.status, result.reason = "skipped", f"the {budget_s:g} s budget is spent"
                    echo(result.render())
                    continue
                began = time.perf_counter()
                context = Context(device, quick, Path(scratch), deadline=began + allotted)
                signal.setitimer(signal.ITIMER_REAL, max(1.0, min(allotted + GRACE_S, left)))
                try:
                    result.report = function(context, result)
                    result.status, result.reason = "done", None
                except Skipped as reason:
                    result.status, result.reason = "skipped", str(reason)
                except OutOfTime as error:
                    result.status, result.reason = "cut", f"{error} after {time.perf_counter() - began:.0f} s"
                except Exception as error:  # recorded, and the next part runs (the rule)
                    result.status = "cut" if isinstance(error, subprocess.TimeoutExpired) else "failed"
                    result.reason = _error_text(error)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    result.seconds = time.perf_counter() - began
                    _free_memory()
                check.elapsed_s = time.perf_counter() - start
                check.write()
                echo(result.render())
        check.finished = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        check.elapsed_s = time.perf_counter() - start
        check.write()
    echo(check.summary().render())
    echo(f"\n{check.elapsed_s:.0f} s; load average {load_average()}; written to {output}")
    return check


# JSON Schema of gpu_check.json (tests/test_gpu_check.py validates a run against it)
_STRING_OR_NULL = {"type": ["string", "null"]}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "command", "started", "finished", "elapsed_s", "budget_s", "quick", "machine",
                 "parts"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "command": {"type": "string"},
        "started": {"type": "string"},
        "finished": {"type": "boolean"},
        "elapsed_s": {"type": "number", "minimum": 0},
        "budget_s": {"type": "number", "exclusiveMinimum": 0},
        "quick": {"type": "boolean"},
        "machine": {
            "type": "object",
            "required": ["summary", "python", "torch", "cuda", "device", "gpu_name", "gpu_memory_mb", "gpus_visible"],
            "properties": {
                "summary": {"type": "string"}, "python": {"type": "string"}, "torch": {"type": "string"},
                "cuda": _STRING_OR_NULL, "device": {"type": "string"}, "gpu_name": _STRING_OR_NULL,
                "gpu_memory_mb": {"type": ["number", "null"]}, "gpus_visible": {"type": "integer", "minimum": 0},
            },
        },
        "parts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "title", "status", "seconds", "reason", "figures", "targets", "tables", "notes"],
                "additionalProperties": False,
                "properties": {
                    "name": {"enum": [name for name, *_ in PARTS]},
                    "title": {"type": "string"},
                    "status": {"enum": list(STATUSES)},
                    "seconds": {"type": "number", "minimum": 0},
                    "reason": _STRING_OR_NULL,
                    "figures": {"type": "object",
                                "additionalProperties": {"type": ["number", "string", "boolean", "null"]}},
                    "targets": {"type": "array", "items": {
                        "type": "object", "required": ["name", "measured", "threshold", "met", "verdict"],
                        "properties": {"name": {"type": "string"}, "measured": {"type": "string"},
                                       "threshold": {"type": "string"}, "met": {"type": ["boolean", "null"]},
                                       "verdict": {"enum": ["met", "not met", "not judged"]}}}},
                    "tables": {"type": "array", "items": {
                        "type": "object", "required": ["title", "columns", "rows"],
                        "properties": {"title": {"type": "string"},
                                       "columns": {"type": "array", "items": {"type": "string"}},
                                       "rows": {"type": "array", "items": {"type": "array",
                                                                           "items": {"type": "string"}}}}}},
                    "notes": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every part at tiny sizes; targets not judged")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="where to run (default: cuda when torch sees a GPU, else cpu)")
    parser.add_argument("--output", type=Path, default=CONFIGS.parent / "runs" / "gpu_check",
                        help="folder of gpu_check.json and gpu_check.md (default runs/gpu_check)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"time budget in seconds, enforced (default {DEFAULT_BUDGET_S:g}: 8 minutes)")
    parser.add_argument("--only", nargs="+", choices=[name for name, *_ in PARTS], help="run only these parts")
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)  # part 6's process under torchrun
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, args.output, args.quick)
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        run_check(device, args.quick, args.output, args.budget_s, echo=lambda text: print(text, flush=True),
                  only=tuple(args.only) if args.only else None, started=PROCESS_STARTED)
    except ValueError as error:  # a bad argument, found before any part runs: one line, no traceback
        sys.exit(f"gpu_check: {error}")


if __name__ == "__main__":
    main()

"""Objective share of the demo step: ``configs/pretrain.json`` as shipped (``LVMMedLoss``) vs the same run with NT-Xent.

``python -m benchmarks.demo_share [--quick] [--threads N] [--iterations K] [--blocks B] [--profile]`` builds the
pretraining workflow of ``make demo`` from ``configs/pretrain.json`` with ``monai.bundle.ConfigParser`` twice, in
one process (the embedded data under a temporary ``data_root``, each side its own temporary ``output_dir``):

- **LVM-Med**: the config as shipped (``LVMMedLoss``);
- **NT-Xent**: the same config with ``--loss "@baseline_objectives#simclr"`` (SimCLR's NT-Xent, MONAI's
  ``ContrastiveLoss``), the override ``docs/ssl_study.md`` trains its baseline with.

Both are the real ``SupervisedTrainer``: same network, data loader, batched augmentation in ``prepare_batch``,
handlers (non-finite guard, gradient clipping, LR schedule, objective statistics, embedding monitor, stats,
TensorBoard, checkpoints, encoder export), optimizer and AMP setting. Each trainer's ``run()`` is interrupted
every K iterations (default 6; Ignite's interrupt / resume) and the two are resumed in turn, B blocks each
(default 8), after a warm-up block of 2 iterations (``Events.STARTED``: the embedding monitor's first evaluation;
the solver's first, compiled call). On CUDA the hooks synchronise the device so that the parts are timed whole.
An iteration's time is the wall time between two ``ITERATION_COMPLETED`` (the first of a block: from the
resume), so it holds the batch fetch, the step and every handler; the figures are medians over the blocks'
iterations (the periodic checkpoint and epoch-end handlers are outliers there; the means are printed too).

The objective share is (t_LVM-Med - t_NT-Xent) / t_LVM-Med. Target (issue 14): <= 10 % at the demo's setting
(64², batch 16, CPU). A second table splits the mean iteration of each side into its parts (hooks on the
network and the objective, MONAI's iteration events, each handler timed), so that the difference can be
located; ``--profile`` adds the operators inside the objective's forward and backward (``torch.profiler``).

:func:`measure` (the timed runs) and :func:`share_report` (their tables and target) are the two halves of
:func:`run`; ``benchmarks.gpu_check`` calls them at 224², batch 2 x 64 on CUDA, with handlers of its own attached.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from benchmarks.common import (Report, Table, Target, build_trainer, default_device, load_average, machine_summary,
                               synchronize)

__all__ = ["SIDES", "ShareRun", "measure", "run", "share_report"]

SHARE_TARGET = 0.10
SIDES: dict[str, dict[str, object]] = {
    "LVM-Med": {},
    "NT-Xent": {"loss": "@baseline_objectives#simclr"},
}
_MARK_PREFIX = "demo_share::"


def _handler_name(function: Callable) -> str:
    parent = getattr(function, "_parent", None)  # Ignite's wrapper of a handler on a filtered event (every=...)
    if parent is not None and parent() is not None:
        function = parent()
    owner = getattr(function, "__self__", None)
    name = getattr(function, "__name__", type(function).__name__)
    if owner is not None:
        return f"{type(owner).__name__}.{name}"
    if hasattr(function, "attach") or not hasattr(function, "__name__"):
        return type(function).__name__
    return getattr(function, "__qualname__", name)


class _IterationRecorder:
    """Times each iteration of a trainer and its parts; interrupts the run after ``block`` iterations.

    Every handler already attached is wrapped with a timer; stamps are added first and last on MONAI's
    iteration events; forward hooks time the network (both views) and the objective; gradient hooks on the
    objective's embedding inputs mark the end of the objective's backward (the autograd engine runs the nodes
    created last first, so the objective's backward precedes the network's).
    """

    def __init__(self, trainer: Any, device: torch.device) -> None:
        self.trainer = trainer
        self.device = device
        self.block = 0
        self.done_in_block = 0
        self.last_stamp = 0.0
        self.recording = False
        self.iterations: list[dict[str, float]] = []
        self._current: dict[str, float] = defaultdict(float)
        self._stamps: dict[str, float] = {}
        self._open: dict[str, float] = {}
        self._objective_backward_open = False
        self._wrap_handlers(trainer)
        model = trainer.network
        self._time_module(model.network, "network forward (2 views)")
        self._time_module(model.objective, "objective forward")
        model.objective.register_forward_pre_hook(self._hook_embeddings)
        for event, where in ((Events.GET_BATCH_STARTED, 0), (Events.GET_BATCH_COMPLETED, 0),
                             (Events.ITERATION_STARTED, 0), (IterationEvents.FORWARD_COMPLETED, 0),
                             (IterationEvents.LOSS_COMPLETED, 0), (IterationEvents.BACKWARD_COMPLETED, 0),
                             (IterationEvents.BACKWARD_COMPLETED, -1), (IterationEvents.MODEL_COMPLETED, 0),
                             (Events.ITERATION_COMPLETED, 0)):
            self._stamp_on(event, where)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._completed)

    # --- instrumentation -------------------------------------------------------------------------------------

    def _wrap_handlers(self, trainer: Any) -> None:
        for event, handlers in trainer._event_handlers.items():
            event_name = getattr(event, "name", str(event))
            for index, (function, args, kwargs) in enumerate(handlers):
                label = f"{event_name}: {_handler_name(function)}"
                handlers[index] = (self._timed(label, function), args, kwargs)

    def _timed(self, label: str, function: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._current["handler " + label] += time.perf_counter() - start

        return timed

    def _stamp_on(self, event: Any, where: int) -> None:
        key = f"{getattr(event, 'name', event)}{'' if where == 0 else ' end'}"

        def stamp(*_: Any) -> None:
            self._stamps[key] = time.perf_counter()

        entry = (stamp, (), {})
        handlers = self.trainer._event_handlers[event]
        if where == 0:
            handlers.insert(0, entry)
        else:
            handlers.append(entry)

    def _time_module(self, module: torch.nn.Module, label: str) -> None:
        def before(*_: Any) -> None:
            synchronize(self.device)
            self._open[label] = time.perf_counter()

        def after(*_: Any) -> None:
            synchronize(self.device)
            self._current[label] += time.perf_counter() - self._open.pop(label)

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def _hook_embeddings(self, module: torch.nn.Module, args: tuple) -> None:
        embeddings = [tensor for tensor in args[:2] if isinstance(tensor, torch.Tensor) and tensor.requires_grad]
        self._objective_backward_open = True
        for tensor in embeddings:
            tensor.register_hook(self._embedding_gradient)

    def _embedding_gradient(self, gradient: torch.Tensor) -> None:
        # a tensor hook runs when the node that consumes the gradient (the projector's last node) starts: the
        # first of the two marks the end of the objective's nodes (created after the network's, so run first)
        if self._objective_backward_open:
            self._objective_backward_open = False
            synchronize(self.device)
            self._stamps["objective backward end"] = time.perf_counter()
            if torch.autograd._profiler_enabled():
                with torch.autograd.profiler.record_function(_MARK_PREFIX + "objective backward end"):
                    pass

    # --- per iteration ---------------------------------------------------------------------------------------

    def _completed(self, engine: Engine) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        stamps, parts = self._stamps, self._current
        if self.recording:
            parts["iteration"] = now - self.last_stamp
            # the spans between stamps hold the handlers of the events they start at: taken out (timed apart)
            if "GET_BATCH_COMPLETED" in stamps and "GET_BATCH_STARTED" in stamps:
                parts["batch fetch (data loader)"] = (stamps["GET_BATCH_COMPLETED"] - stamps["GET_BATCH_STARTED"]
                                                      - self._handlers_of(parts, "GET_BATCH_STARTED"))
            forward = stamps["FORWARD_COMPLETED"] - stamps["ITERATION_STARTED"]
            parts["prepare_batch (batched augmentation) + crop grids"] = (
                forward - parts["network forward (2 views)"] - parts["objective forward"]
                - self._handlers_of(parts, "ITERATION_STARTED"))
            backward_end = stamps["BACKWARD_COMPLETED"]
            objective_end = min(stamps.get("objective backward end", backward_end), backward_end)
            parts["objective backward"] = (objective_end - stamps["LOSS_COMPLETED"]
                                           - self._handlers_of(parts, "LOSS_COMPLETED"))
            parts["network backward"] = backward_end - objective_end
            parts["optimizer step"] = stamps["MODEL_COMPLETED"] - stamps["BACKWARD_COMPLETED end"]
            self.iterations.append(dict(parts))
        self._current = defaultdict(float)
        self._stamps = {}
        self.last_stamp = time.perf_counter()
        self.done_in_block += 1
        if self.done_in_block >= self.block:
            engine.interrupt()

    @staticmethod
    def _handlers_of(parts: dict[str, float], event: str) -> float:
        return sum(value for key, value in parts.items() if key.startswith(f"handler {event}: "))

    def run_block(self, iterations: int, record: bool) -> None:
        """Resumes the trainer for ``iterations`` iterations (the first call starts it)."""
        self.block, self.done_in_block, self.recording = iterations, 0, record
        self._current = defaultdict(float)
        self._stamps = {}
        synchronize(self.device)
        self.last_stamp = time.perf_counter()
        self.trainer.run()

    def finish(self) -> None:
        """Ends the interrupted run without its ``COMPLETED`` handlers (final checkpoint, monitor, export)."""
        self.block = 10**9
        self.trainer.terminate(skip_completed=True)
        self.trainer.run()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _profile_objective(recorder: _IterationRecorder, iterations: int) -> list[Table]:
    """Operators inside the objective's forward (its top-level calls) and backward (autograd nodes between the
    loss and the objective's embedding gradients), summed over ``iterations`` LVM-Med iterations, in ms/iteration."""
    objective = recorder.trainer.network.objective
    ranges: list[Any] = []

    def enter(*_: Any) -> None:
        scope = torch.autograd.profiler.record_function(_MARK_PREFIX + "objective forward")
        scope.__enter__()
        ranges.append(scope)

    def leave(*_: Any) -> None:
        ranges.pop().__exit__(None, None, None)

    def loss_done(engine: Engine) -> None:
        with torch.autograd.profiler.record_function(_MARK_PREFIX + "objective backward start"):
            pass

    handles = [objective.register_forward_pre_hook(enter), objective.register_forward_hook(leave)]
    recorder.trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, loss_done)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            recorder.run_block(iterations, record=False)
    finally:
        for handle in handles:
            handle.remove()
        recorder.trainer.remove_event_handler(loss_done, IterationEvents.LOSS_COMPLETED)
    events = profiler.events()
    forward_ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    backward_ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    forward_wall = backward_wall = 0.0
    starts = [e.time_range.start for e in events if e.name == _MARK_PREFIX + "objective backward start"]
    ends = [e.time_range.start for e in events if e.name == _MARK_PREFIX + "objective backward end"]
    windows = list(zip(sorted(starts), sorted(ends)))
    for event in events:
        if event.name == _MARK_PREFIX + "objective forward":
            forward_wall += event.time_range.elapsed_us()
            for child in event.cpu_children:
                forward_ops[child.name][0] += child.cpu_time_total
                forward_ops[child.name][1] += 1
    for event in events:
        if not event.name.startswith("autograd::engine::evaluate_function"):
            continue
        start, end = event.time_range.start, event.time_range.end
        for low, high in windows:
            # the end mark is made in the pre-hook of the network's first node, whose range holds it: left out
            if low <= start and end <= high:
                backward_ops[event.name.split(": ", 1)[-1]][0] += event.cpu_time_total
                backward_ops[event.name.split(": ", 1)[-1]][1] += 1
                break
    backward_wall = sum(high - low for low, high in windows)
    scale = 1e-3 / iterations  # us summed over the iterations -> ms per iteration
    tables = []
    for title, ops, wall in (("forward: top-level operators inside LVMMedLoss.forward", forward_ops, forward_wall),
                             ("backward: autograd nodes of the objective", backward_ops, backward_wall)):
        table = Table(f"Profile of the objective, {title} (ms per iteration, {iterations} iterations)",
                      ["operator", "calls / iteration", "ms / iteration", "share of the objective's " + title.split(":")[0]])
        listed = sorted(ops.items(), key=lambda item: -item[1][0])
        for name, (total, count) in listed[:15]:
            table.add(name, f"{count / iterations:g}", f"{total * scale:.2f}", f"{total / max(wall, 1e-9):.1%}")
        rest = sum(total for _, (total, _) in listed[15:])
        covered = sum(total for _, (total, _) in listed)
        table.add(f"{max(len(listed) - 15, 0)} other operators", "-", f"{rest * scale:.2f}", f"{rest / max(wall, 1e-9):.1%}")
        table.add("outside operators (Python, numba solver, hooks)", "-", f"{(wall - covered) * scale:.2f}",
                  f"{(wall - covered) / max(wall, 1e-9):.1%}")
        table.add("wall time (profiled)", "-", f"{wall * scale:.2f}", "100%")
        tables.append(table)
    return tables


@dataclass
class ShareRun:
    """What :func:`measure` recorded: per side, each timed iteration's parts (seconds), and the run's settings."""

    records: dict[str, list[dict[str, float]]]
    settings: dict[str, object]
    warmup_seconds: dict[str, float]
    timed_seconds: float
    blocks: int
    iterations: int
    warmup: int
    device: torch.device
    profile_tables: list[Table] = field(default_factory=list)

    def median(self, name: str) -> float:
        """Median seconds per iteration of one side."""
        return _median([row["iteration"] for row in self.records[name]])

    @property
    def share(self) -> float:
        """(t_LVM-Med - t_NT-Xent) / t_LVM-Med on the medians."""
        return (self.median("LVM-Med") - self.median("NT-Xent")) / self.median("LVM-Med")


def measure(
    overrides: dict[str, object], iterations: int, blocks: int, warmup: int, device: torch.device,
    profile: bool = False, profile_iterations: int = 3, deadline: float | None = None,
    on_trainer: Callable[[str, Any], None] | None = None, after_block: Callable[[str, Any], None] | None = None,
) -> ShareRun:
    """Builds both sides with ``overrides`` and times them interleaved (see the module docstring).

    Args:
        overrides: config ids and values applied to both sides (``device`` and AMP are set from ``device``).
        iterations, blocks, warmup: iterations per block, timed blocks per side, warm-up iterations per side.
        device: the training device.
        profile, profile_iterations: also profile the objective's operators over that many LVM-Med iterations.
        deadline: ``time.perf_counter()`` after which no further block starts (at least one runs per side).
        on_trainer: called with (side, trainer) once each trainer is built, to attach extra handlers.
        after_block: called with (side, trainer) after each timed block of that side.
    """
    if iterations < 1 or blocks < 1 or warmup < 1:
        raise ValueError(f"iterations, blocks and warmup must be >= 1, got {iterations}, {blocks}, {warmup}")
    overrides = {"device": f"$torch.device({str(device)!r})", "train#trainer#amp": device.type == "cuda",
                 **overrides}
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        recorders: dict[str, _IterationRecorder] = {}
        settings: dict[str, object] = {}
        for name, side in SIDES.items():
            parser, trainer = build_trainer(root, name, {**overrides, **side})
            settings.update({key: parser.get_parsed_content(key) for key in
                             ("image_size", "batch_size", "num_workers", "augmentation", "monitor_interval")})
            settings["amp"] = trainer.amp
            settings["epoch_length"] = trainer.state.epoch_length
            settings["objective " + name] = type(parser.get_parsed_content("loss")).__name__
            needed = warmup + blocks * iterations + (profile_iterations if profile else 0) + 1
            if trainer.state.max_epochs * trainer.state.epoch_length < needed:  # more than the config's run
                trainer.state.max_epochs = -(-needed // trainer.state.epoch_length)  # LR milestones unchanged
            if on_trainer is not None:
                on_trainer(name, trainer)
            recorders[name] = _IterationRecorder(trainer, device)
        start = time.perf_counter()
        warmup_seconds = {}
        for name, recorder in recorders.items():  # Events.STARTED, first (compiled) solver call
            began = time.perf_counter()
            recorder.run_block(warmup, record=False)
            warmup_seconds[name] = time.perf_counter() - began
        done = 0
        while done < blocks and (done == 0 or deadline is None or time.perf_counter() < deadline):
            for name, recorder in recorders.items():
                recorder.run_block(iterations, record=True)
                if after_block is not None:
                    after_block(name, recorder.trainer)
            done += 1
        timed_seconds = time.perf_counter() - start
        profile_tables: list[Table] = []
        if profile:
            profile_tables = _profile_objective(recorders["LVM-Med"], profile_iterations)
        for recorder in recorders.values():
            recorder.finish()
    return ShareRun({name: recorder.iterations for name, recorder in recorders.items()}, settings, warmup_seconds,
                    timed_seconds, done, iterations, warmup, device, profile_tables)


def share_report(measured: ShareRun, judged: bool) -> Report:
    """The tables and the target of a :func:`measure` run (``judged``: whether the target's verdict counts)."""
    settings, records, device = measured.settings, measured.records, measured.device
    medians = {name: measured.median(name) for name in records}
    means = {name: statistics.fmean(r["iteration"] for r in rows) for name, rows in records.items()}
    share = measured.share
    mean_share = (means["LVM-Med"] - means["NT-Xent"]) / means["LVM-Med"]
    describe = (f"image {settings['image_size']}², batch {settings['batch_size']}, {settings['augmentation']} "
                f"augmentation, num_workers {settings['num_workers']}, AMP {settings['amp']}, {device.type}")
    report = Report(f"Objective share of the demo step (configs/pretrain.json: {describe})")
    report.notes.append(f"machine: {machine_summary(device)}")
    report.notes.append(
        f"{measured.blocks} blocks of {measured.iterations} iterations per side, alternated, after {measured.warmup} "
        f"warm-up iteration(s) per side; {measured.timed_seconds:.0f} s in all; epoch length {settings['epoch_length']}")
    report.notes.append(
        "warm-up (not timed): " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in measured.warmup_seconds.items())
        + " (Events.STARTED: the embedding monitor's first evaluation, once per side; LVM-Med's first solver call "
        "loads the numba cache of scripts/objective/qap.py, or compiles it when the cache is cold)")
    table = Table("Seconds per training iteration (trainer.run(), all handlers)",
                  ["run", "objective", "median s/it", "mean s/it", "iterations timed", "min s/it", "max s/it"])
    for name, rows in records.items():
        values = [r["iteration"] for r in rows]
        table.add(name, settings["objective " + name], f"{medians[name]:.3f}", f"{means[name]:.3f}", len(values),
                  f"{min(values):.3f}", f"{max(values):.3f}")
    table.add("objective share", "(LVM-Med - NT-Xent) / LVM-Med", f"**{share:.1%}**", f"{mean_share:.1%}", "-", "-", "-")
    report.tables.append(table)
    report.tables.append(_breakdown(records))
    report.tables.extend(measured.profile_tables)
    report.notes.append(f"load average at the end: {load_average()}")
    report.targets.append(Target(
        f"objective share of the step ({device.type}, {settings['image_size']}², batch {settings['batch_size']}, "
        f"LVM-Med vs NT-Xent side by side, medians)", f"{share:.1%}", f"<= {SHARE_TARGET:.0%}",
        share <= SHARE_TARGET if judged else None))
    return report


def run(
    quick: bool = False, iterations: int | None = None, blocks: int | None = None, warmup: int | None = None,
    profile: bool = False, profile_iterations: int = 3,
) -> Report:
    """Times both trainers, interleaved, at the demo's setting (``quick``: 64² views, batch 8, no loader workers,
    embedding monitor off, 2 blocks of 2 iterations; not judged)."""
    overrides: dict[str, object] = {}
    if quick:
        overrides.update(image_size=64, batch_size=8, monitor_interval=None, num_workers=0)
    device = default_device()
    measured = measure(overrides, iterations or (2 if quick else 6), blocks or (2 if quick else 8),
                       warmup if warmup is not None else (1 if quick else 2), device, profile, profile_iterations)
    settings = measured.settings
    judged = not quick and device.type == "cpu" and settings["image_size"] == 64 and settings["batch_size"] == 16
    return share_report(measured, judged)


def _breakdown(records: dict[str, list[dict[str, float]]]) -> Table:
    """Mean ms per iteration of each part, both sides, and their difference."""
    names = list(records)
    parts: list[str] = []
    for rows in records.values():
        for row in rows:
            parts.extend(key for key in row if key not in parts and key != "iteration")
    table = Table("Where an iteration's time goes (mean ms per iteration over the timed iterations)",
                  ["part", *(f"{name} ms" for name in names), "difference ms", "share of LVM-Med's extra"])
    mean = {name: {part: statistics.fmean(row.get(part, 0.0) for row in rows) * 1000 for part in parts}
            for name, rows in records.items()}
    totals = {name: statistics.fmean(row["iteration"] for row in rows) * 1000 for name, rows in records.items()}
    extra = totals[names[0]] - totals[names[1]]
    ordered = sorted(parts, key=lambda part: -(abs(mean[names[0]][part]) + abs(mean[names[1]][part])))
    shown = [p for p in ordered if max(mean[n][p] for n in names) >= 0.05]
    for part in shown:
        difference = mean[names[0]][part] - mean[names[1]][part]
        table.add(part, *(f"{mean[n][part]:.1f}" for n in names), f"{difference:+.1f}",
                  f"{difference / extra:.0%}" if extra > 0 else "-")
    other = {n: totals[n] - sum(mean[n].values()) for n in names}
    table.add("other (between the parts: epoch events, Ignite's loop)", *(f"{other[n]:.1f}" for n in names),
              f"{other[names[0]] - other[names[1]]:+.1f}",
              f"{(other[names[0]] - other[names[1]]) / extra:.0%}" if extra > 0 else "-")
    table.add("whole iteration", *(f"{totals[n]:.1f}" for n in names), f"{extra:+.1f}", "100%" if extra > 0 else "-")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; target not judged")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per block (default 6)")
    parser.add_argument("--blocks", type=int, default=None, help="timed blocks per side (default 8)")
    parser.add_argument("--profile", action="store_true", help="also profile the objective's operators")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(run(args.quick, args.iterations, args.blocks, profile=args.profile).render())


if __name__ == "__main__":
    main()

"""What one step of the LVM-Med objective asks of the device: operator calls, synchronisations, time.

``python -m benchmarks.objective_profile [--quick] [--threads N] [--encoder-repeats R]`` runs one forward +
backward of ``LVMMedLoss`` (default settings) on 16 graphs of 16 images, as issue 14 counts it: embeddings
256 x 128 (view 2 = view 1 + noise, as two augmented views are related), feature maps 256 x 2048 x 7 x 7,
grids from ``crop_grid`` of random crop boxes and flips. After one warm-up step, ``torch.profiler`` records
one step and counts

- top-level operator calls: ``aten::`` events not nested inside another ``aten::`` event (each is at least
  one kernel launch on CUDA), split into those inside the solver's calls and the rest (listed by name);
- device-to-host synchronisations: ``aten::_local_scalar_dense``, ``aten::item`` and ``aten::nonzero``
  events not nested inside one another; on CUDA also the warnings of ``torch.cuda.set_sync_debug_mode("warn")``
  over one step (they include the solver's copies to the host and back, which no profiler event names).

It then times (median of ``--repeats``) the objective step and the solver's share of it (the thread's CPU
time inside the solver calls, i.e. its cost on one core, and their wall time), then the ResNet-50 forward +
backward at 224 x 224 on batch 2 x 32 (2 x 64 with AMP on CUDA; ``--encoder-repeats 0`` skips it) and the
objective on the same 32 (64) images, whose ratio is the objective's share of the step. The
targets of issue 14 are printed met / not met. ``--quick`` runs 2 graphs of 16 images with small feature
maps and no encoder (targets "not judged"), for the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.common import Report, Table, Target, default_device, machine_summary, synchronize
from scripts.networks.resnet_encoder import ResNet50Encoder
from scripts.objective.geometry import crop_grid
from scripts.objective.lvmmed_loss import LVMMedLoss
from scripts.objective.qap import QAPBatch

__all__ = ["ProfileSetting", "StepCounts", "TimedSolver", "count_events", "make_inputs", "profile_step", "run"]

SYNC_EVENTS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::nonzero"})
SOLVER_LABEL = "objective_profile::solver"
OPS_TARGET = 300
SYNCS_TARGET = 5
SOLVER_MS_TARGET = 10.0
SHARE_TARGET = 0.03


@dataclass(frozen=True)
class ProfileSetting:
    """Sizes of the profiled step: graphs x graph_size images."""

    graphs: int = 16
    graph_size: int = 16
    embedding_dim: int = 128
    channels: int = 2048
    cells: int = 7


@dataclass
class StepCounts:
    """What the profiler saw in one objective step."""

    top_level_ops: int = 0
    solver_ops: int = 0
    syncs: int = 0
    solver_calls: int = 0
    outside_solver: Counter[str] = field(default_factory=Counter)
    sync_names: Counter[str] = field(default_factory=Counter)
    sync_warnings: int | None = None


class TimedSolver:
    """Wraps a solver: labels its calls for the profiler and adds up their thread CPU time and wall time."""

    def __init__(self, solver: Callable[[QAPBatch], torch.Tensor]) -> None:
        self.solver = solver
        self.calls = 0
        self.cpu_seconds = 0.0
        self.wall_seconds = 0.0

    def reset(self) -> None:
        self.calls, self.cpu_seconds, self.wall_seconds = 0, 0.0, 0.0

    def __call__(self, problem: QAPBatch) -> torch.Tensor:
        with record_function(SOLVER_LABEL):
            cpu, wall = time.thread_time(), time.perf_counter()
            matching = self.solver(problem)
            synchronize(matching.device)
            self.cpu_seconds += time.thread_time() - cpu
            self.wall_seconds += time.perf_counter() - wall
        self.calls += 1
        return matching


def make_inputs(setting: ProfileSetting, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Leaf tensors of one step (requiring gradients, as the encoder's outputs do) and their grids."""
    generator = torch.Generator().manual_seed(seed)
    count = setting.graphs * setting.graph_size
    random = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    first = random(count, setting.embedding_dim)
    inputs = {
        "embeddings1": first,
        "embeddings2": first + random(count, setting.embedding_dim),
        "features1": random(count, setting.channels, setting.cells, setting.cells).relu(),
        "features2": random(count, setting.channels, setting.cells, setting.cells).relu(),
    }
    inputs = {name: value.to(device).requires_grad_() for name, value in inputs.items()}
    for view in ("1", "2"):
        corner = torch.rand(count, 2, generator=generator) * 0.4
        side = 0.5 + torch.rand(count, 1, generator=generator) * 0.5
        boxes = torch.cat([corner, (corner + side).clamp_max(1.0)], 1)
        flipped = torch.rand(count, generator=generator) < 0.5
        inputs[f"grid{view}"] = crop_grid(boxes, flipped, (setting.cells, setting.cells)).to(device)
    return inputs


def _step(loss_fn: LVMMedLoss, inputs: dict[str, torch.Tensor]) -> None:
    for value in inputs.values():
        value.grad = None
    loss_fn(**inputs).backward()


def _ancestors(event: object) -> list[str]:
    names = []
    parent = getattr(event, "cpu_parent", None)
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def count_events(events: list, solver_calls: int = 0) -> StepCounts:
    """Counts a profiler's FunctionEvents as issue 14 does (see the module docstring)."""
    counts = StepCounts(solver_calls=solver_calls)
    for event in events:
        above = _ancestors(event)
        if event.name.startswith("aten::") and not any(name.startswith("aten::") for name in above):
            counts.top_level_ops += 1
            if SOLVER_LABEL in above:
                counts.solver_ops += 1
            else:
                counts.outside_solver[event.name] += 1
        if event.name in SYNC_EVENTS and not SYNC_EVENTS.intersection(above):
            counts.syncs += 1
            counts.sync_names[event.name] += 1
    return counts


def profile_step(loss_fn: LVMMedLoss, inputs: dict[str, torch.Tensor], device: torch.device) -> StepCounts:
    """One warm-up step, then one profiled step (and on CUDA one step under the sync debug mode)."""
    timed = loss_fn.solver
    if not isinstance(timed, TimedSolver):
        raise TypeError(f"loss_fn.solver must be a TimedSolver, got {type(timed).__name__}")
    _step(loss_fn, inputs)
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    timed.reset()
    with profile(activities=activities) as profiler:
        _step(loss_fn, inputs)
        synchronize(device)
    counts = count_events(list(profiler.events()), timed.calls)
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _step(loss_fn, inputs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.sync_warnings = sum("synchroniz" in str(warning.message) for warning in caught)
    return counts


def _median_seconds(function: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``repeats`` runs of function (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _encoder_step(device: torch.device, batch: int, amp: bool) -> Callable[[], None]:
    """ResNet-50 forward + backward on both views (2 x batch images at 224 x 224)."""
    encoder = ResNet50Encoder().to(device)
    images = torch.randn(2 * batch, 3, 224, 224, device=device)

    def step() -> None:
        encoder.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            feature_map, pooled = encoder(images)
            total = feature_map.float().mean() + pooled.float().mean()
        total.backward()

    return step


def run(quick: bool = False, repeats: int = 3, encoder_repeats: int = 1, device: torch.device | None = None) -> Report:
    device = device or default_device()
    setting = ProfileSetting(graphs=2, channels=64, cells=3) if quick else ProfileSetting()
    report = Report("Objective step: operator calls, synchronisations, solver and objective time")
    report.notes.append(f"machine: {machine_summary(device)}")
    loss_fn = LVMMedLoss(embedding_dim=setting.embedding_dim, graph_size=setting.graph_size).to(device)
    timed = TimedSolver(loss_fn.solver)
    loss_fn.solver = timed
    inputs = make_inputs(setting, device)
    counts = profile_step(loss_fn, inputs, device)

    cuda = device.type == "cuda"
    encoder_batch = 64 if cuda else 32
    objective_times, solver_cpu, solver_wall = [], [], []
    for _ in range(repeats):
        timed.reset()
        objective_times.append(_median_seconds(lambda: _step(loss_fn, inputs), 1, device))
        solver_cpu.append(timed.cpu_seconds)
        solver_wall.append(timed.wall_seconds)
    objective_seconds = statistics.median(objective_times)
    encoder_seconds = objective_at_encoder_batch = None
    if not quick and encoder_repeats > 0:
        encoder_step = _encoder_step(device, encoder_batch, amp=cuda)
        encoder_step()  # warm-up
        encoder_seconds = _median_seconds(encoder_step, encoder_repeats, device)
        # the share compares the objective with the encoder on the same images: 2 x encoder_batch views
        same_batch = make_inputs(replace(setting, graphs=encoder_batch // setting.graph_size), device)
        timed.reset()
        objective_at_encoder_batch = _median_seconds(lambda: _step(loss_fn, same_batch), repeats, device)

    images = setting.graphs * setting.graph_size
    table = Table(
        f"One LVMMedLoss step, {setting.graphs} graphs x {setting.graph_size} images ({images} x "
        f"{setting.embedding_dim} embeddings, {setting.channels} x {setting.cells} x {setting.cells} feature maps), "
        f"{device.type}",
        ["quantity", "measured", "target", "verdict"],
    )
    solver_ms = 1e3 * statistics.median(solver_cpu)
    share = None if encoder_seconds is None else objective_at_encoder_batch / encoder_seconds
    rows = [
        ("top-level operator calls per step", counts.top_level_ops, OPS_TARGET, counts.top_level_ops <= OPS_TARGET),
        ("device-to-host synchronisations per step (profiler events)", counts.syncs, SYNCS_TARGET,
         counts.syncs <= SYNCS_TARGET),
    ]
    if counts.sync_warnings is not None:
        rows.append(("synchronisation warnings (set_sync_debug_mode)", counts.sync_warnings, SYNCS_TARGET,
                     counts.sync_warnings <= SYNCS_TARGET))
    rows.append(("solver ms per step, thread CPU time (one core)", f"{solver_ms:.2f}", SOLVER_MS_TARGET,
                 solver_ms <= SOLVER_MS_TARGET))
    for name, measured, threshold, met in rows:
        verdict = "not judged" if quick else "met" if met else "not met"
        table.add(name, measured, f"<= {threshold}", verdict)
    table.add("solver ms per step, wall time", f"{1e3 * statistics.median(solver_wall):.2f}", "-", "-")
    table.add("solver calls per step", counts.solver_calls, "1 (forward + target fused)", "-")
    table.add("operator calls inside the solver", counts.solver_ops, "-", "-")
    table.add("objective ms per step (forward + backward)", f"{1e3 * objective_seconds:.1f}", "-", "-")
    encoder_name = f"ResNet-50 fwd+bwd ms, 224², batch 2 x {encoder_batch}{' (AMP)' if cuda else ''}"
    if encoder_seconds is None:
        table.add(encoder_name, "not measured (quick or --encoder-repeats 0)", "-", "-")
    else:
        table.add(encoder_name, f"{1e3 * encoder_seconds:.0f}", "-", "-")
        table.add(f"objective ms per step on the same {encoder_batch} images", f"{1e3 * objective_at_encoder_batch:.1f}",
                  "-", "-")
        share_target = 0.10 if cuda else SHARE_TARGET
        table.add("objective / ResNet-50 step", f"{share:.2%}", f"<= {share_target:.0%}",
                  "met" if share <= share_target else "not met")
    report.tables.append(table)
    report.figures.update(operator_calls=counts.top_level_ops, sync_events=counts.syncs,
                          sync_warnings=counts.sync_warnings, solver_ms=round(solver_ms, 3),
                          objective_ms=round(1e3 * objective_seconds, 3))
    outside = ", ".join(f"{name} {count}" for name, count in counts.outside_solver.most_common(25))
    report.notes.append(f"top-level operator calls outside the solver, most frequent first: {outside}")
    syncs = ", ".join(f"{name} {count}" for name, count in counts.sync_names.most_common()) or "none"
    report.notes.append(f"synchronising events: {syncs}")
    report.notes.append(
        "Solver time is the thread's CPU time inside the solver calls: its cost on one core, which the other "
        "processes of a loaded machine do not inflate the way they inflate wall time."
    )
    judged = lambda met: None if quick else met  # noqa: E731
    report.targets += [
        Target("objective top-level operator calls per step", str(counts.top_level_ops), f"<= {OPS_TARGET}",
               judged(counts.top_level_ops <= OPS_TARGET)),
        Target("objective device-to-host synchronisations per step", str(counts.syncs), f"<= {SYNCS_TARGET}",
               judged(counts.syncs <= SYNCS_TARGET)),
        Target("solver ms per step (forward + target), one core", f"{solver_ms:.2f}", f"<= {SOLVER_MS_TARGET:g}",
               judged(solver_ms <= SOLVER_MS_TARGET)),
    ]
    if share is not None:
        share_target = 0.10 if cuda else SHARE_TARGET
        report.targets.append(Target(f"objective / ResNet-50 step ({device.type})", f"{share:.2%}",
                                     f"<= {share_target:.0%}", share <= share_target))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; targets not judged")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed objective steps (median)")
    parser.add_argument("--encoder-repeats", type=int, default=1,
                        help="timed ResNet-50 steps after a warm-up (0: skip the encoder)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(run(args.quick, args.repeats, args.encoder_repeats).render())


if __name__ == "__main__":
    main()

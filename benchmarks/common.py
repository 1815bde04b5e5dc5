"""Timing, memory and table helpers shared by the benchmarks.

Timings on a shared machine are noisy, so every comparison the targets rest on is measured *in one run*,
the candidates interleaved round-robin and summarised by their median (:func:`interleaved_medians`).
Each benchmark module returns a :class:`Report`: tables to print and targets marked met / not met.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

__all__ = [
    "CONFIGS",
    "build_trainer",
    "Table",
    "Target",
    "Report",
    "default_device",
    "synchronize",
    "interleaved_medians",
    "PeakMemory",
    "machine_summary",
    "load_average",
]


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def build_trainer(
    root: Path, name: str, overrides: dict[str, object], config_files: Sequence[str] = ("pretrain.json",)
) -> tuple[ConfigParser, Any]:
    """A bundle config's ``train#trainer`` as ``monai.bundle run`` builds it (``initialize`` run first), writing
    under ``root / name``; the data under ``root / "data"`` (shared by every trainer built under ``root``).

    Args:
        root: scratch folder of the benchmark.
        name: sub-folder of ``root`` for this trainer's outputs (checkpoints, TensorBoard, exported encoder).
        overrides: config ids and values applied after the defaults above (``monai.bundle`` ``--key value``).
        config_files: files under ``configs/`` merged in order, as ``--config_file "['a.json', 'b.json']"``.
    """
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / file) for file in config_files])
    parser.update({
        "bundle_root": str(CONFIGS.parent),
        "data_root": str(root / "data"),
        "output_dir": str(root / name),
        "encoder_export_path": str(root / name / "encoder.pt"),
        **overrides,
    })
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    parser.get_parsed_content("run#0")  # the config's preparation of the handlers (MLflow only) before training
    return parser, trainer


def default_device() -> torch.device:
    """The CUDA device when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Waits for queued CUDA kernels so that wall-clock times cover them (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Table:
    """A titled table of pre-formatted cells."""

    title: str
    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.title!r} has {len(self.columns)} columns, got a row of {len(cells)}")
        self.rows.append([str(cell) for cell in cells])

    def render(self) -> str:
        """The table in Markdown, so that it pastes into docs/performance.md as printed."""
        widths = [max(len(str(c)), *(len(r[i]) for r in self.rows)) for i, c in enumerate(self.columns)]
        line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        body = [line(self.columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        return "\n".join([f"### {self.title}", "", *body, *(line(r) for r in self.rows)])


@dataclass
class Target:
    """A performance target of issue 7: what was measured against which threshold, and whether it holds
    (None: not judged, e.g. in a quick smoke run at a smaller setting than the target's)."""

    name: str
    measured: str
    threshold: str
    met: bool | None

    @property
    def verdict(self) -> str:
        return "not judged" if self.met is None else "met" if self.met else "not met"

    def render(self) -> str:
        return f"[{self.verdict}] {self.name}: {self.measured} (target {self.threshold})"


@dataclass
class Report:
    """What one benchmark prints: tables, targets and free-text notes; and figures, its main numbers by name, for
    callers that record them (``benchmarks.gpu_check``'s JSON)."""

    name: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, float | int | None] = field(default_factory=dict)

    def render(self) -> str:
        parts = [f"## {self.name}", ""]
        for table in self.tables:
            parts += [table.render(), ""]
        parts += [f"- {note}" for note in self.notes]
        if self.notes:
            parts.append("")
        parts += [target.render() for target in self.targets]
        return "\n".join(parts).rstrip() + "\n"


def interleaved_medians(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Median wall-clock seconds of each candidate, run round-robin ``repeats`` times after ``warmup`` rounds.

    Interleaving spreads the load of other processes evenly over the candidates, so their ratios stay
    meaningful on a busy machine even when the absolute times drift.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = device or torch.device("cpu")
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(warmup + repeats):
        for name, function in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block above its starting point: CUDA's allocator statistics on a GPU, the process's
    resident set size sampled every millisecond on the CPU (the CPU allocator keeps no peak statistic).

    Example::

        with PeakMemory(device) as memory:
            network(images)
        print(memory.peak_bytes)
    """

    def __init__(self, device: torch.device, interval: float = 0.001) -> None:
        self.device = device
        self.interval = interval
        self.peak_bytes = 0
        self._baseline = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() - self._baseline)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            self._baseline = _rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._baseline
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() - self._baseline)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_summary(device: torch.device) -> str:
    """One line naming the machine the figures were taken on."""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU only, {_cpu_model()}"
    return (
        f"{where}; {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"load average {load_average()}"
    )

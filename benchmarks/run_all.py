"""All benchmarks of issue 7 in one command, with every target marked met / not met.

``python -m benchmarks.run_all [--quick] [--threads N] [--only solver objective step inference data augmentation data_scale demo_share]``
prints the tables of ``benchmarks.solver``, ``benchmarks.objective_profile``, ``benchmarks.step_breakdown``, ``benchmarks.inference``,
``benchmarks.data_loading``, ``benchmarks.augmentation``, ``benchmarks.data_scale`` and ``benchmarks.demo_share`` in Markdown, then a summary of the targets. ``--quick`` is a smoke run at tiny
sizes whose timing targets are "not judged". The full run takes tens of minutes on a 2-core CPU (one
ResNet-50 step at 224 x 224, batch 32, takes about two minutes there). Exit status 0 whatever the verdicts:
a benchmark reports, it does not gate.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks import (augmentation, data_loading, data_scale, demo_share, inference, objective_profile, solver,
                        step_breakdown)
from benchmarks.common import Report, default_device, machine_summary

__all__ = ["BENCHMARKS", "run_all"]

BENCHMARKS: dict[str, Callable[[bool], Report]] = {
    "solver": lambda quick: solver.run(quick),
    "objective": lambda quick: objective_profile.run(quick),
    "step": lambda quick: step_breakdown.run(quick),
    "inference": lambda quick: inference.run(quick),
    "data": lambda quick: data_loading.run(quick),
    "augmentation": lambda quick: augmentation.run(quick),
    "data_scale": lambda quick: data_scale.run(quick),
    "demo_share": lambda quick: demo_share.run(quick),
}


def run_all(quick: bool = False, only: list[str] | None = None, echo: Callable[[str], None] = print) -> list[Report]:
    """Runs the chosen benchmarks (all by default), echoing each report as it completes."""
    names = only or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; choose from {sorted(BENCHMARKS)}")
    echo(f"# Benchmarks{' (quick smoke run)' if quick else ''}\n\nmachine: {machine_summary(default_device())}\n")
    reports = []
    for name in names:
        report = BENCHMARKS[name](quick)
        echo(report.render())
        reports.append(report)
    echo("## Targets\n")
    for report in reports:
        for target in report.targets:
            echo(target.render())
    echo(f"\nload average at the end: {machine_summary(default_device()).rsplit('load average ', 1)[-1]}")
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; timing targets not judged")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_all(args.quick, args.only, echo=lambda text: print(text, flush=True))


if __name__ == "__main__":
    main()

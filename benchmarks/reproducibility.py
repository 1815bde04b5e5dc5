"""What makes two seeded pretraining runs differ: the same config and seed at several CPU thread counts.

``python -m benchmarks.reproducibility [--threads 2 1 2] [--iterations 6] [--batch-size 8] [--image-size 32]``

Runs ``configs/pretrain.json`` (embedded data, seed 0, the objective's defaults) once per thread count given, in
one process, and prints each run's losses and the first iteration at which they leave the first run's. Runs at the
same thread count repeat bit for bit; another thread count splits float sums differently, and the Hamming loss of
the graph matching turns a last-bit difference into another matching, after which the runs part. This is why a
figure such as ``make demo``'s kNN accuracy is reproducible on one machine (torch uses as many threads as cores,
and oneDNN picks its kernels by the CPU's instruction set) and varies across machines (``docs/pretraining.md``).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow

REPOSITORY = Path(__file__).resolve().parents[1]

__all__ = ["pretraining_losses", "first_difference", "main"]


def pretraining_losses(output_dir: Path, data_root: Path, iterations: int | None = None,
                       **overrides: Any) -> tuple[list[float], dict[str, float]]:
    """Runs ``configs/pretrain.json`` in this process at a small size (32 px, batch 32, one epoch, no workers, no
    monitor; ``overrides`` win); returns the loss of every iteration and the trainer's metrics at the end."""
    settings = {
        "bundle_root": str(REPOSITORY), "output_dir": str(output_dir / "run"), "data_root": str(data_root),
        "encoder_export_path": str(output_dir / "encoder.pt"), "image_size": 32, "batch_size": 32, "max_epochs": 1,
        "monitor_interval": None, "balance_modalities": False, "num_workers": 0, "checkpoint_interval": 1000,
        "cache_rate": 0.0, **overrides,
    }
    if iterations is not None:
        settings["train#trainer#epoch_length"] = iterations
    workflow = ConfigWorkflow(config_file=str(REPOSITORY / "configs" / "pretrain.json"), workflow_type="train",
                              **settings)
    workflow.initialize()
    trainer: Engine = workflow.parser.get_parsed_content("train#trainer")
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output["loss"].item()))
    workflow.run()
    metrics = dict(trainer.state.metrics)
    workflow.finalize()
    return losses, metrics


def first_difference(losses: Sequence[float], reference: Sequence[float]) -> int | None:
    """1-based iteration of the first loss that differs from ``reference``'s; None when all agree."""
    return next((index + 1 for index, (a, b) in enumerate(zip(losses, reference)) if a != b), None)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1, 2], help="torch CPU threads of each run")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    if any(threads < 1 for threads in args.threads):
        raise SystemExit(f"--threads must be positive, got {args.threads}")
    before = torch.get_num_threads()
    runs: list[tuple[int, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="reproducibility_") as folder:
        root = Path(folder)
        try:
            for index, threads in enumerate(args.threads):
                torch.set_num_threads(threads)
                losses, _ = pretraining_losses(root / f"run_{index}", root / "data", iterations=args.iterations,
                                               batch_size=args.batch_size, image_size=args.image_size)
                runs.append((threads, losses))
        finally:
            torch.set_num_threads(before)
    reference = runs[0][1]
    print(f"configs/pretrain.json, seed 0, {args.iterations} iterations of batch {args.batch_size} at "
          f"{args.image_size} px; CPU (default threads: {torch.get_num_threads()}), torch {torch.__version__}")
    for index, (threads, losses) in enumerate(runs):
        parted = first_difference(losses, reference)
        verdict = "the reference" if index == 0 else (
            "identical to the first run" if parted is None else f"differs from iteration {parted} on")
        print(f"run {index + 1}, {threads} thread(s): losses {[round(loss, 4) for loss in losses]}: {verdict}")


if __name__ == "__main__":
    main()

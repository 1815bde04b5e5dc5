"""Two-view augmentation throughput: ``TwoViewAugmentd`` per sample vs ``BatchTwoViewAugment`` on batches.

``python -m benchmarks.augmentation [--quick] [--threads N]`` augments the same fixed-size sources both ways,
interleaved round-robin in one run (medians of the rounds), and prints samples per second (a sample is both
views): per sample, each source through ``TwoViewAugmentd`` (the per-sample path of ``configs/pretrain.json``);
batched, one call of ``BatchTwoViewAugment`` on the collated batch (the default path, run in the trainer's
``prepare_batch``). Both draw the same recipe (crop 25-100 %, flip, jitter 80 %, blur 50 %). Views 224 x 224
from 256 x 256 sources and 64 x 64 from 128 x 128 (the config's ``source_size``, twice the view), grey
(1 channel, most medical images) and colour (3), batch 16 (the config's). On CUDA, the batched path on batches
of 256 sources already on the device, beside the per-view path (:func:`device_rates`, which
``benchmarks.gpu_check`` also runs).

Targets (issue 14): batched >= 10x the per-sample throughput on one CPU core at 224 x 224; >= 5,000 samples/s
on a GPU (batch 256 at 224 x 224, when one is present).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import Report, Table, Target, interleaved_medians, load_average, machine_summary
from scripts.transforms.batch_two_view import BatchTwoViewAugment
from scripts.transforms.two_view import TwoViewAugmentd

__all__ = ["GPU_BATCH", "GPU_RATE_TARGET", "device_rates", "run"]

CPU_RATIO_TARGET = 10.0
GPU_RATE_TARGET = 5000.0
SETTINGS = ((224, 256), (64, 128))  # (view, source) sides
BATCH = 16
GPU_BATCH = 256


def _sources(count: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] (content does not change the cost of either path)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, channels, side // 8, side // 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)


def _cpu_rows(view: int, source: int, channels: int, repeats: int, batch: int) -> tuple[float, float]:
    """(per-sample, batched) seconds per sample on the CPU, interleaved medians."""
    images = _sources(batch, channels, source)
    per_sample = TwoViewAugmentd("image", spatial_size=view).set_random_state(0)
    batched = BatchTwoViewAugment(spatial_size=view, seed=0)

    def each() -> None:
        for image in images:
            per_sample({"image": image})

    times = interleaved_medians({"per_sample": each, "batched": lambda: batched(images)}, repeats=repeats)
    return times["per_sample"] / batch, times["batched"] / batch


def device_rates(
    view: int, source: int, channels: int, repeats: int, batch: int, device: torch.device
) -> dict[str, float]:
    """Samples per second on ``device`` (sources already there), interleaved medians, of two paths:

    - ``batched``: one ``BatchTwoViewAugment`` call on the whole batch (the default path);
    - ``per view``: the same transform called on one source at a time, so that its operator calls (on CUDA
      kernel launches) grow with the batch, as they did in the per-view path tried on the CPU for issue 14
      (``docs/performance.md``; that path's own code was not kept, its operations were the same kind).
    """
    images = _sources(batch, channels, source).to(device)
    batched = BatchTwoViewAugment(spatial_size=view, seed=0)

    def per_view() -> None:
        for index in range(batch):
            batched(images[index:index + 1])

    seconds = interleaved_medians({"batched": lambda: batched(images), "per view": per_view}, repeats=repeats,
                                  warmup=2, device=device)
    return {path: batch / value for path, value in seconds.items()}


def run(quick: bool = False, repeats: int = 5) -> Report:
    """Measures both paths at 224² and 64², grey and colour, on the CPU; the batched path on CUDA when present
    (``quick``: 64² and 32² views, batch 4, one round; not judged)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    settings, batch = (((64, 72), (32, 64)), 4) if quick else (SETTINGS, BATCH)
    repeats = 1 if quick else repeats
    cpu = torch.device("cpu")
    report = Report(f"Two-view augmentation throughput (batch {batch}, interleaved medians of {repeats} rounds)")
    report.notes.append(f"machine: {machine_summary(cpu)}")
    table = Table("CPU, the threads above (`--threads 1`: one core)",
                  ["view (source)", "channels", "per-sample ms", "batched ms", "per-sample samples/s",
                   "batched samples/s", "batched / per-sample"])
    for view, source in settings:
        for channels in (1, 3):
            each, together = _cpu_rows(view, source, channels, repeats, batch)
            ratio = each / together
            table.add(f"{view}² ({source}²)", channels, f"{1000 * each:.2f}", f"{1000 * together:.2f}",
                      f"{1 / each:.0f}", f"{1 / together:.0f}", f"{ratio:.1f}x")
            if view == settings[0][0]:
                report.targets.append(Target(
                    f"batched vs per-sample throughput, CPU ({torch.get_num_threads()} thread(s)), {view}², "
                    f"{'grey' if channels == 1 else 'colour'}", f"{ratio:.1f}x", f">= {CPU_RATIO_TARGET:g}x",
                    None if quick or torch.get_num_threads() != 1 else ratio >= CPU_RATIO_TARGET))
    report.tables.append(table)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        gpu = Table(f"CUDA ({torch.cuda.get_device_name(device)}), batched path, sources on the device",
                    ["view (source)", "channels", "batch", "batched samples/s", "per-view samples/s"])
        gpu_batch = batch if quick else GPU_BATCH
        for view, source in settings:
            for channels in (1, 3):
                rates = device_rates(view, source, channels, repeats, gpu_batch, device)
                rate = rates["batched"]
                gpu.add(f"{view}² ({source}²)", channels, gpu_batch, f"{rate:,.0f}", f"{rates['per view']:,.0f}")
                if view == settings[0][0]:
                    report.targets.append(Target(
                        f"batched throughput on CUDA, {view}², {'grey' if channels == 1 else 'colour'}, "
                        f"batch {gpu_batch}", f"{rate:,.0f} samples/s", f">= {GPU_RATE_TARGET:,.0f} samples/s",
                        None if quick else rate >= GPU_RATE_TARGET))
        report.tables.append(gpu)
    else:
        report.notes.append("no CUDA device: the GPU row (>= 5,000 samples/s) is not measured")
    report.notes.append(f"load average at the end: {load_average()}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; targets not judged")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(run(args.quick, args.repeats).render())


if __name__ == "__main__":
    main()

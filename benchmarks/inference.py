"""Segmentation inference speed and memory: the bundle's inferer vs a bare forward of the same network.

``python -m benchmarks.inference [--quick]`` builds the segmentation networks of ``configs/inference.json``
(``scripts.segmentation.architectures.segmentation_network``: ``unet_r50`` and ``transunet``, 1 input channel,
3 classes, random weights) and measures in one run, interleaved and repeated, in ``torch.inference_mode``:

- 2D: a 512 x 512 image through MONAI's ``SliceInferer`` as the bundle runs it (a volume of one slice), and
  the bare ``network(image)``;
- 3D: a 256 x 256 x 64 volume slice-wise through ``SliceInferer`` (slices along the last axis,
  ``sw_batch_size`` slices per forward, as ``batch_size`` in the config), and the bare network on the same 64
  slices stacked into batches of the same size.

It prints images or slices per second and the peak memory above the starting point (CUDA allocator peak on a
GPU; sampled resident memory on the CPU). Target (issue 7): slice-wise 3D time <= 1.2x the bare forward's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from monai.inferers import SliceInferer

from benchmarks.common import PeakMemory, Report, Table, Target, default_device, interleaved_medians, machine_summary
from scripts.segmentation.architectures import segmentation_network

__all__ = ["run"]

SLICE_TIME_TARGET = 1.2
CLASSES = 3


NETWORKS = ("unet_r50", "transunet")
TINY_VIT = {"vit_args": {"embed_dim": 64, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,)}}


def _network(name: str, quick: bool, device: torch.device) -> torch.nn.Module:
    """One of the bundle's architectures; ``quick`` shrinks TransUNet's ViT (the U-Net has no size option)."""
    options = TINY_VIT if quick and name == "transunet" else None
    return segmentation_network(name, 1, CLASSES, options).to(device).eval()


def _bare_forward(network: torch.nn.Module, slices: torch.Tensor, batch: int) -> Callable[[], torch.Tensor]:
    """network on (S, C, H, W) slices in batches of ``batch``: the floor any slice-wise inferer can reach."""

    def forward() -> torch.Tensor:
        return torch.cat([network(chunk) for chunk in slices.split(batch)])

    return forward


def _status_kilobytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_megabytes(device: torch.device, network: str, key: str, quick: bool, sw_batch_size: int,
                    function: Callable[[], object]) -> float:
    """Peak memory of one call above the memory held before it.

    On the CPU the allocator keeps freed memory resident, so a call measured after others would look free: each
    path runs once in a fresh process instead (with a fixed mmap threshold, so that large tensors are returned
    to the system when freed), reporting its peak resident set (VmHWM) minus its resident set before the call.
    """
    if device.type == "cuda":
        with PeakMemory(device) as memory:
            function()
        return memory.peak_bytes / 2**20
    command = [sys.executable, "-m", "benchmarks.inference", "--peak-memory", network, key,
               "--sw-batch-size", str(sw_batch_size), "--threads", str(torch.get_num_threads())]
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    result = subprocess.run(command + (["--quick"] if quick else []), capture_output=True, text=True,
                            env=environment, cwd=Path(__file__).resolve().parents[1], check=True)
    return float(result.stdout.split()[-1])


def _cases(
    quick: bool, sw_batch_size: int, device: torch.device, networks: tuple[str, ...] = NETWORKS
) -> tuple[dict, tuple[int, tuple[int, int, int]]]:
    """{network name: {path: callable}} and the (2D size, volume shape) they run on."""
    size_2d, volume_shape = (64, (64, 64, 8)) if quick else (512, (256, 256, 64))
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 1, size_2d, size_2d, generator=generator).to(device)
    volume = torch.randn(1, 1, *volume_shape, generator=generator).to(device)
    slices = volume[0].permute(3, 0, 1, 2).contiguous()  # (S, 1, H, W): the slices along the last axis
    inferer_2d = SliceInferer(roi_size=(size_2d, size_2d), spatial_dim=2, sw_batch_size=1, progress=False)
    inferer_3d = SliceInferer(roi_size=volume_shape[:2], spatial_dim=2, sw_batch_size=sw_batch_size, progress=False)
    cases = {}
    for name in networks:
        network = _network(name, quick, device)
        cases[name] = {
            "2d bare": (lambda network: lambda: network(image))(network),
            "2d inferer": (lambda network: lambda: inferer_2d(image[..., None], network))(network),
            "3d bare": _bare_forward(network, slices, sw_batch_size),
            "3d inferer": (lambda network: lambda: inferer_3d(volume, network))(network),
        }
    return cases, (size_2d, volume_shape)


def _measure_peak_here(network: str, key: str, quick: bool, sw_batch_size: int) -> float:
    """Megabytes above the resident set before one call of ``key``, in this (fresh) process."""
    cases, _ = _cases(quick, sw_batch_size, torch.device("cpu"), (network,))
    function = cases[network][key]
    with torch.inference_mode():
        before = _status_kilobytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM, the peak resident set, to the current one
        function()
        return (_status_kilobytes("VmHWM") - before) / 1024


def run(
    quick: bool = False, repeats: int = 2, sw_batch_size: int = 8, memory: bool = True, dims: tuple[str, ...] = ("2d", "3d")
) -> Report:
    """Measures 2D and 3D inference; ``quick`` uses 64 x 64 images and a 64 x 64 x 8 volume; ``memory=False``
    skips the peak-memory measurements (on the CPU each takes a fresh process)."""
    device = default_device()
    repeats = 1 if quick else repeats
    cases, (size_2d, volume_shape) = _cases(quick, sw_batch_size, device)
    report = Report("Inference: MONAI SliceInferer (as configs/inference.json) vs bare forward")
    report.notes.append(f"machine: {machine_summary(device)}")
    report.notes.append("networks: scripts.segmentation.architectures.segmentation_network (unet_r50 = ResNet50UNet on "
                        "MONAI FlexibleUNet, transunet = TransUNet on SAM ViT-B), 1 channel, 3 classes"
                        + (" (quick: TransUNet with a 2-block ViT of width 64)" if quick else ""))
    table = Table(
        f"median of {repeats} interleaved runs, torch.inference_mode, float32",
        ["network", "input", "path", "ms", "per second", "peak MB", "time / bare"],
    )
    for name, candidates in cases.items():
        candidates = {key: function for key, function in candidates.items() if key.split()[0] in dims}
        with torch.inference_mode():
            # warm-up on the cheapest path (one 3D pass takes minutes on a CPU), and a check that the inferer
            # computes what the bare network does
            checked = "3d" if quick or "2d" not in dims else "2d"
            check, expected = candidates[f"{checked} inferer"](), candidates[f"{checked} bare"]()
            expected = expected.permute(1, 2, 3, 0)[None] if checked == "3d" else expected[..., None]
            if not torch.allclose(check, expected, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"{name}: SliceInferer and the bare forward disagree")
            medians = interleaved_medians(candidates, repeats=repeats, warmup=0, device=device)
        peaks = {key: _peak_megabytes(device, name, key, quick, sw_batch_size, function) if memory else float("nan")
                 for key, function in candidates.items()}
        count = {"2d": 1, "3d": volume_shape[2]}
        for key in candidates:
            dimension, path = key.split()
            bare = medians[f"{dimension} bare"]
            shape = f"{size_2d}x{size_2d}" if dimension == "2d" else "x".join(map(str, volume_shape))
            unit = "images" if dimension == "2d" else "slices"
            path_name = "bare forward" if path == "bare" else f"SliceInferer (sw_batch_size {1 if dimension == '2d' else sw_batch_size})"
            table.add(name, shape, path_name, f"{1e3 * medians[key]:.0f}",
                      f"{count[dimension] / medians[key]:.2f} {unit}", f"{peaks[key]:.0f}",
                      f"{medians[key] / bare:.3f}x")
        if "3d" not in dims:
            continue
        ratio = medians["3d inferer"] / medians["3d bare"]
        report.targets.append(Target(
            f"{name}: slice-wise 3D time vs bare forward ({device.type})", f"{ratio:.3f}x",
            f"<= {SLICE_TIME_TARGET}x", None if quick else ratio <= SLICE_TIME_TARGET,
        ))
    report.tables.append(table)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sw-batch-size", type=int, default=8, help="slices per forward (the config's batch_size)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dims", nargs="+", choices=("2d", "3d"), default=["2d", "3d"], help="cases to run")
    parser.add_argument("--peak-memory", nargs=2, metavar=("NETWORK", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_memory:  # one measurement in a fresh process, for _peak_megabytes
        print(f"{_measure_peak_here(*args.peak_memory, args.quick, args.sw_batch_size):.1f}")
        return
    print(run(args.quick, args.repeats, args.sw_batch_size, dims=tuple(args.dims)).render())


if __name__ == "__main__":
    main()

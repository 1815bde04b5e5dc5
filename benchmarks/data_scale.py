"""Does the data layer scale? Manifest and index of 1k, 10k and 100k tiny 2D files (and 1 % as many volumes).

``python -m benchmarks.data_scale [--quick] [--sizes 1000 10000 100000] [--root DIR]`` writes tiny files in a
temporary folder (8 x 8 PNGs in folders of 1,000; 8 x 8 x 4 NIfTI volumes, one per 100 PNGs, in folders of
100), copied from a few templates written once so that generating 100k files takes seconds; then, each in a
fresh process so that its peak memory is its own:

- ``make_manifest``: scanning the tree into a manifest (``scripts/make_manifest.py``);
- index, cold: ``PretrainSliceDataset(manifest)`` reading every header (no header cache yet);
- index, restart: the same again, reusing the header cache that the first one left beside the manifest.

It prints wall-clock seconds (and the process's CPU seconds, which a loaded machine inflates less), files per
second and peak resident memory (the whole process, imports included, and its
increase during the step), and deletes the files. Targets (issue 14): at 100,000 2D files and 1,000 volumes
the cold index takes <= 60 s and <= 1 GB; time grows linearly (seconds per file at the largest size within
1.5x of the smaller sizes'); the restart reads no header again (all reused) and is faster than the cold index.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from benchmarks.common import Report, Table, Target, load_average, machine_summary

__all__ = ["generate_tree", "run"]

REPO = Path(__file__).resolve().parents[1]
TIME_TARGET_S = 60.0
MEMORY_TARGET_BYTES = 2**30
LINEARITY_TOLERANCE = 1.5
FILES_PER_FOLDER = 1000
VOLUMES_PER_FOLDER = 100
PNGS_PER_VOLUME = 100


def _templates() -> tuple[list[bytes], list[bytes]]:
    """Bytes of a few distinct 8 x 8 grey PNGs and 8 x 8 x 4 int16 NIfTI volumes (.nii.gz)."""
    rng = np.random.default_rng(0)
    pngs, volumes = [], []
    for _ in range(4):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
        volume = nib.Nifti1Image(rng.integers(-1000, 1000, (8, 8, 4)).astype(np.int16), np.eye(4))
        volumes.append(gzip.compress(volume.to_bytes(), compresslevel=1))
    return pngs, volumes


def generate_tree(root: Path, images: int) -> tuple[int, int]:
    """Writes ``images`` PNGs and ``images // 100`` volumes (at least 1) below ``root``; returns the counts."""
    pngs, volumes = _templates()
    count_volumes = max(1, images // PNGS_PER_VOLUME)
    for number in range(images):
        folder = root / "xray" / f"d{number // FILES_PER_FOLDER:04d}"
        if number % FILES_PER_FOLDER == 0:
            folder.mkdir(parents=True)
        (folder / f"img{number:06d}.png").write_bytes(pngs[number % len(pngs)])
    for number in range(count_volumes):
        folder = root / "ct" / f"v{number // VOLUMES_PER_FOLDER:03d}"
        if number % VOLUMES_PER_FOLDER == 0:
            folder.mkdir(parents=True)
        (folder / f"vol{number:05d}.nii.gz").write_bytes(volumes[number % len(volumes)])
    return images, count_volumes


# run in a fresh interpreter per step: prints {"seconds", "peak_bytes", "baseline_bytes", ...} as JSON
_CHILD = r"""
import json, sys, time
step, root, manifest = sys.argv[1:4]
from scripts.data.slices import PretrainSliceDataset
from scripts.make_manifest import make_manifest
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
baseline = rss()
start, cpu = time.perf_counter(), time.process_time()
extra = {}
if step == "manifest":
    entries, unreadable = make_manifest(root, manifest, {"xray": "X-ray", "ct": "CT"})
    extra = {"entries": len(entries), "unreadable": len(unreadable)}
else:
    dataset = PretrainSliceDataset(manifest, on_error="raise")
    extra = {"samples": len(dataset), "reused": dataset.headers_reused, "read": dataset.headers_read}
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_bytes": rss(), "baseline_bytes": baseline, **extra}))
"""


def _step(step: str, root: Path, manifest: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD, step, str(root), str(manifest)], cwd=REPO,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{step} failed on {root}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(quick: bool = False, sizes: list[int] | None = None, root: Path | None = None) -> Report:
    """Measures manifest writing and indexing at each size (``quick``: 200 and 1,000 files)."""
    sizes = sorted(sizes or ([200, 1000] if quick else [1000, 10_000, 100_000]))
    if min(sizes) < 1:
        raise ValueError(f"sizes must be positive, got {sizes}")
    report = Report("Data layer at scale: manifest and index of tiny files")
    report.notes.append(f"machine: {machine_summary(torch.device('cpu'))}")
    table = Table("one fresh process per step; peak = the process's peak resident memory (imports included)",
                  ["2D files + volumes", "generate s", "make_manifest s", "index cold s (CPU s)", "cold files/s",
                   "cold peak MB (+ during)", "restart s", "restart peak MB", "headers reused"])
    rows = []
    base = Path(root) if root is not None else Path(tempfile.gettempdir())
    for size in sizes:
        folder = Path(tempfile.mkdtemp(prefix=f"lvmmed-scale-{size}-", dir=base))
        try:
            start = time.perf_counter()
            images, volumes = generate_tree(folder / "data", size)
            generate = time.perf_counter() - start
            manifest = folder / "manifest.json"
            made = _step("manifest", folder / "data", manifest)
            cold = _step("index", folder / "data", manifest)
            restart = _step("index", folder / "data", manifest)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        files = images + volumes
        hits, misses = restart["reused"], restart["read"]
        rows.append((size, files, cold, restart, hits, misses))
        table.add(f"{images:,} + {volumes:,}", f"{generate:.1f}", f"{made['seconds']:.1f}",
                  f"{cold['seconds']:.1f} ({cold['cpu_seconds']:.1f})",
                  f"{files / cold['seconds']:,.0f}",
                  f"{cold['peak_bytes'] / 2**20:.0f} (+{(cold['peak_bytes'] - cold['baseline_bytes']) / 2**20:.0f})",
                  f"{restart['seconds']:.1f}", f"{restart['peak_bytes'] / 2**20:.0f}", f"{hits:,} of {hits + misses:,}")
    report.tables.append(table)
    report.notes.append(f"load average at the end: {load_average()}")
    largest, files, cold, restart, hits, misses = rows[-1]
    judged = None if quick or largest < 100_000 else True
    report.targets.append(Target(f"index of {largest:,} 2D files + {largest // PNGS_PER_VOLUME:,} volumes, time",
                                 f"{cold['seconds']:.1f} s", f"<= {TIME_TARGET_S:g} s",
                                 None if judged is None else cold["seconds"] <= TIME_TARGET_S))
    report.targets.append(Target(f"index of {largest:,} 2D files, peak memory of the process",
                                 f"{cold['peak_bytes'] / 2**20:.0f} MB", "<= 1024 MB",
                                 None if judged is None else cold["peak_bytes"] <= MEMORY_TARGET_BYTES))
    if len(rows) > 1:
        per_file = [row[2]["seconds"] / row[1] for row in rows]
        growth = per_file[-1] / min(per_file[:-1])
        report.targets.append(Target("index time grows linearly (seconds per file, largest / smallest of the others)",
                                     f"{growth:.2f}x", f"<= {LINEARITY_TOLERANCE:g}x",
                                     None if quick else growth <= LINEARITY_TOLERANCE))
    report.targets.append(Target(f"restart reuses the header index ({largest:,} files)",
                                 f"{hits:,} reused, {misses:,} read; {restart['seconds']:.1f} s vs {cold['seconds']:.1f} s",
                                 "every header reused, faster than cold",
                                 misses == 0 and restart["seconds"] < cold["seconds"]))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 and 1,000 files; time targets not judged")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="numbers of 2D files (default 1k 10k 100k)")
    parser.add_argument("--root", type=Path, default=None, help="where to write the files (default: the temp dir)")
    args = parser.parse_args()
    print(run(args.quick, args.sizes, args.root).render())


if __name__ == "__main__":
    main()

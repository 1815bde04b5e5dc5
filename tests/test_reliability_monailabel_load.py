"""The MONAI Label server under a bounded load from this (second) process: 50 inference requests, 8 at a time,
to 127.0.0.1 only. Every response must be a valid mask; none may be lost. The server's peak memory is reported.

Uses the real server of tests/test_monailabel.py (its fixtures; MONAI Label's own environment).
"""

from __future__ import annotations

import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_monailabel import MODEL, _read_mask, installed, server  # noqa: E402,F401 - fixtures used by name

pytestmark = pytest.mark.slow
REQUESTS, CONCURRENCY = 50, 8
NUM_CLASSES = 3  # configs/inference.json


def server_processes(port: int) -> list[int]:
    """The pids of the server listening on ``port`` (found by its command line) and of all its descendants."""
    parents: dict[int, int] = {}
    roots = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if b"start_server" in command and str(port).encode() in command:
            roots.append(int(entry.name))
    tree, grew = set(roots), True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return sorted(tree)


def resident_kib(pids: list[int], field: str) -> int:
    """Sum of ``field`` (``VmRSS``: now, ``VmHWM``: the process's peak) over ``pids``, in KiB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def test_fifty_requests_eight_at_a_time_all_answered_with_valid_masks(installed, server, tmp_path):
    port = int(server["url"].rsplit(":", 1)[1])
    pids = server_processes(port)
    assert pids, "the server process was not found"
    source = nib.load(installed["image"])
    peak_sum = [resident_kib(pids, "VmRSS")]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak_sum[0] = max(peak_sum[0], resident_kib(server_processes(port), "VmRSS"))

    def infer(number: int) -> tuple[int, float, tuple[int, ...], set[int]]:
        started = time.monotonic()
        request = urllib.request.Request(f"{server['url']}/infer/{MODEL}?image=anatomical&output=image", method="POST")
        with urllib.request.urlopen(request, timeout=1800) as response:
            status, payload = response.status, response.read()
        folder = tmp_path / str(number)
        folder.mkdir()
        mask = np.asarray(_read_mask(payload, folder).dataobj)
        return status, time.monotonic() - started, mask.shape, set(np.unique(mask).astype(int).tolist())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        answers = list(pool.map(infer, range(REQUESTS)))
    wall = time.monotonic() - started
    done.set()
    sampler.join()

    assert len(answers) == REQUESTS  # none lost: pool.map raises on any failed request
    for status, _, shape, labels in answers:
        assert status == 200
        assert shape == source.shape
        assert labels <= set(range(NUM_CLASSES)) and labels
    latencies = sorted(seconds for _, seconds, _, _ in answers)
    peak_hwm = resident_kib(server_processes(port), "VmHWM")
    print(f"\nMONAI Label load: {REQUESTS} requests, {CONCURRENCY} at a time, all answered in {wall:.1f} s; latency "
          f"median {latencies[REQUESTS // 2]:.1f} s, max {latencies[-1]:.1f} s; server peak memory "
          f"{peak_sum[0] / 2**20:.2f} GiB resident (sampled), {peak_hwm / 2**20:.2f} GiB (sum of per-process peaks)")

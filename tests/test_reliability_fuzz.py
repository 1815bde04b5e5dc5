"""Mutated real DICOM and NIfTI files give only ImageReadError naming the file: no other exception, hang or crash."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

ADDRESS_SPACE = 8 * 2**30  # a mutant announcing a huge image meets MemoryError, not the machine's memory limit


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def fuzz(cases: int, timeout: int) -> dict:
    """Runs tests/fuzz_readers.py in its own process, so that a crash of a reader fails the test, not pytest."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "fuzz_readers.py"), str(cases)],
                            cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=timeout, preexec_fn=limit_memory)
    assert result.returncode == 0, f"the fuzzing process died ({result.returncode}): {result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def check(report: dict, cases: int) -> None:
    assert report["escapes"] == [], "\n".join(report["escapes"][:5])
    assert report["cases"] == cases
    # both outcomes occur: the mutations neither all break the files nor all miss
    assert report["outcomes"]["read_header ImageReadError"] > 0 and report["outcomes"]["read_image read"] > 0


def test_fifty_mutants_of_each_run_raise_only_image_read_errors() -> None:
    check(fuzz(50, timeout=300), 50)


@pytest.mark.slow  # about 5 min on the shared 2-core machine
def test_a_thousand_mutants_raise_only_image_read_errors() -> None:
    check(fuzz(1000, timeout=1800), 1000)

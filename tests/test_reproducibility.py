"""benchmarks.reproducibility: seeded pretraining runs at one thread count repeat, and the report says so."""

from __future__ import annotations

import pytest

from benchmarks.reproducibility import first_difference, main


def test_first_difference_names_the_first_parting_iteration() -> None:
    assert first_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) is None
    assert first_difference([1.0, 2.5, 3.0], [1.0, 2.0, 4.0]) == 2


def test_runs_at_the_same_thread_count_are_identical(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--threads", "1", "1", "--iterations", "3", "--batch-size", "8"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("run 1, 1 thread(s)") and lines[-2].endswith("the reference")
    assert lines[-1].startswith("run 2, 1 thread(s)") and lines[-1].endswith("identical to the first run")


def test_thread_counts_must_be_positive() -> None:
    with pytest.raises(SystemExit, match="--threads must be positive"):
        main(["--threads", "0"])

"""Smoke runs of the benchmarks of issue 7 at tiny sizes, and the helpers they rest on. No timing is asserted:
only that every benchmark runs, prints its tables and reports each target (not judged in a quick run). The
runs that build ResNet-50 or the segmentation networks are marked slow."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from benchmarks import data_loading, inference, solver, step_breakdown
from benchmarks.common import Report, Table, Target, interleaved_medians
from benchmarks.run_all import run_all
from conftest import REPO_ROOT
from scripts.objective.qap import GraphMatchingSolver, qap_score

HAS_PYGMTOOLS = importlib.util.find_spec("pygmtools") is not None


def test_dense_affinity_matrix_scores_like_the_sparse_problem() -> None:
    problem = solver.make_problems(7, 3, "random", seed=1, dtype=torch.float64)
    affinity = solver.dense_affinity_matrix(problem)
    matching = torch.stack([torch.eye(7, dtype=torch.float64)[torch.randperm(7)] for _ in range(3)])
    vector = matching.transpose(1, 2).reshape(3, -1, 1)  # pygmtools' column-wise vec(X)
    torch.testing.assert_close((vector.mT @ affinity @ vector).flatten(), qap_score(problem, matching))
    larger = solver.dense_affinity_matrix(solver.make_problems(16, 1, "views", seed=1))
    assert float((larger == 0).double().mean()) > 0.8  # kNN edges (k=5): 86 % zeros at n=16, 96 % at n=32


def test_brute_force_agrees_with_the_exact_solver() -> None:
    problem = solver.make_problems(6, 4, "views", seed=2, dtype=torch.float64)
    optimum, permutations = solver.brute_force(problem)
    exact = GraphMatchingSolver(seed=0)(problem)
    torch.testing.assert_close(qap_score(problem, exact), optimum)
    as_matrices = torch.nn.functional.one_hot(permutations, 6).double()
    torch.testing.assert_close(qap_score(problem, as_matrices), optimum)


def test_make_problems_rejects_an_unknown_family() -> None:
    with pytest.raises(ValueError, match="family"):
        solver.make_problems(8, 2, "grid", seed=0)


def test_solver_benchmark_quick() -> None:
    report = solver.run(quick=True)
    text = report.render()
    assert "| views" in text and "ours ms" in text
    exact = [t for t in report.targets if "exact" in t.name]
    assert len(exact) == 1 and exact[0].met  # correctness, not timing: the enumeration is optimal
    if HAS_PYGMTOOLS:
        assert any("speed-up" in t.name for t in report.targets)
        assert "RRWM not measured" not in text
    else:
        assert "RRWM not measured" in text


@pytest.mark.skipif(not HAS_PYGMTOOLS, reason="pygmtools (benchmarks/requirements.txt) is not installed")
def test_pygmtools_imports_no_torchvision() -> None:
    code = (
        "import sys, torch, pygmtools\n"
        "from benchmarks.solver import rrwm_hungarian\n"
        "x = rrwm_hungarian(torch.rand(2, 16, 16), 4)\n"
        "assert x.shape == (2, 4, 4), x.shape\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'timm')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow  # builds ResNet-50 / the segmentation networks: tens of seconds on 2 cores
def test_step_breakdown_quick() -> None:
    report = step_breakdown.run(quick=True)
    text = report.render()
    for part in (*step_breakdown.PARTS, "encoder + projector", "objective total"):
        assert part in text
    assert [t.met for t in report.targets] == [None, None]  # quick: not judged
    assert "not judged" in text


@pytest.mark.slow  # builds ResNet-50 / the segmentation networks: tens of seconds on 2 cores
def test_inference_quick() -> None:
    report = inference.run(quick=True, memory=False)
    text = report.render()
    assert text.count("SliceInferer (sw_batch_size") == 4 and text.count("bare forward") >= 4
    assert [t.met for t in report.targets] == [None, None]


@pytest.mark.slow  # builds ResNet-50 / the segmentation networks: tens of seconds on 2 cores
def test_inference_peak_memory_in_a_fresh_process() -> None:
    megabytes = inference._peak_megabytes(torch.device("cpu"), "transunet", "2d bare", True, 2, lambda: None)
    assert megabytes > 0  # the forward allocates activations


@pytest.mark.slow  # builds ResNet-50 / the segmentation networks: tens of seconds on 2 cores
def test_data_loading_quick(tmp_path) -> None:
    report = data_loading.run(quick=True, data_root=tmp_path / "data")
    text = report.render()
    assert "loader throughput / step rate" in text and "num_workers" in text
    assert report.targets[0].met is None


def test_run_all_refuses_unknown_benchmarks() -> None:
    with pytest.raises(ValueError, match="unknown benchmarks"):
        run_all(quick=True, only=["nope"], echo=lambda _: None)


def test_report_rendering_and_validation() -> None:
    table = Table("t", ["a", "b"])
    table.add(1, "two")
    with pytest.raises(ValueError, match="2 columns"):
        table.add(1)
    report = Report("r", [table], [Target("x", "1", "<= 2", True), Target("y", "3", "<= 2", False)])
    text = report.render()
    assert "| 1 | two |" in text and "[met] x" in text and "[not met] y" in text
    assert Target("z", "-", "-", None).render().startswith("[not judged]")
    with pytest.raises(ValueError, match="repeats"):
        interleaved_medians({"f": lambda: None}, repeats=0)
    medians = interleaved_medians({"f": lambda: None, "g": lambda: None}, repeats=3)
    assert set(medians) == {"f", "g"} and all(value >= 0 for value in medians.values())


@pytest.mark.slow  # builds ResNet-50 twice (the demo's workflow as shipped and with NT-Xent): about 30 s on 2 cores
def test_demo_share_quick() -> None:
    from benchmarks import demo_share
    from benchmarks.run_all import BENCHMARKS

    report = demo_share.run(quick=True)
    text = report.render()
    for row in ("| LVM-Med", "| NT-Xent", "| objective share", "objective forward", "objective backward",
                "network forward (2 views)", "optimizer step", "ObjectiveStats", "whole iteration"):
        assert row in text, row
    assert [t.met for t in report.targets] == [None]  # quick: not judged
    assert "not judged" in text and "(target <= 10%)" in text
    assert "demo_share" in BENCHMARKS  # python -m benchmarks.run_all --only demo_share

"""The objective profile of issue 14 at a tiny size: its event counting and the bounds it reports."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks import objective_profile
from benchmarks.objective_profile import ProfileSetting, TimedSolver, count_events, make_inputs, profile_step
from scripts.objective.lvmmed_loss import LVMMedLoss


def _event(name: str, parent: SimpleNamespace | None = None) -> SimpleNamespace:
    return SimpleNamespace(name=name, cpu_parent=parent)


def test_events_nested_in_operators_or_syncs_count_once() -> None:
    step = _event("autograd::engine::evaluate_function: MulBackward0")
    solver = _event(objective_profile.SOLVER_LABEL)
    item = _event("aten::item")
    where = _event("aten::where", solver)
    events = [
        step,
        _event("aten::mul", step),  # top level: only a non-aten event above it
        _event("aten::empty", _event("aten::zeros")),  # nested
        item,
        _event("aten::_local_scalar_dense", item),  # the same synchronisation, nested
        solver,
        _event("aten::cat", solver),
        where,
        _event("aten::nonzero", where),  # a sync nested in an operator
    ]
    events.append(events[2].cpu_parent)
    counts = count_events(events, solver_calls=1)
    assert (counts.top_level_ops, counts.solver_ops, counts.syncs) == (5, 2, 2)
    assert counts.outside_solver == {"aten::mul": 1, "aten::item": 1, "aten::zeros": 1}
    assert counts.sync_names == {"aten::item": 1, "aten::nonzero": 1}


def _profile(graphs: int) -> objective_profile.StepCounts:
    setting = ProfileSetting(graphs=graphs, graph_size=8, embedding_dim=16, channels=8, cells=3)
    loss_fn = LVMMedLoss(embedding_dim=16, graph_size=8, num_neighbors=3, gcn_features=(16,))
    loss_fn.solver = TimedSolver(loss_fn.solver)
    return profile_step(loss_fn, make_inputs(setting, torch.device("cpu")), torch.device("cpu"))


def test_operator_calls_and_syncs_do_not_grow_with_the_number_of_graphs() -> None:
    small, large = _profile(2), _profile(6)
    for counts in (small, large):
        assert counts.solver_calls == 1  # forward and target problems in one call
        assert 0 < counts.solver_ops <= 15 < counts.top_level_ops
        assert sum(counts.outside_solver.values()) == counts.top_level_ops - counts.solver_ops
        assert counts.syncs == sum(counts.sync_names.values())
    assert large.top_level_ops == small.top_level_ops and large.syncs == small.syncs


def test_quick_report_lists_every_target() -> None:
    text = objective_profile.run(quick=True, repeats=1).render()
    for name in ("top-level operator calls per step", "synchronisations per step", "solver ms per step"):
        assert name in text
    assert "not judged" in text and "outside the solver" in text


def test_the_default_objective_stays_within_issue_14s_budget() -> None:
    """<= 300 operator calls and <= 5 synchronisations per step: the counts do not depend on the sizes, so small
    feature maps give the full-size figures (289 calls, 2 syncs on 2026-12-01)."""
    setting = ProfileSetting(graphs=2, channels=32, cells=7)
    loss_fn = LVMMedLoss()
    loss_fn.solver = TimedSolver(loss_fn.solver)
    counts = profile_step(loss_fn, make_inputs(setting, torch.device("cpu")), torch.device("cpu"))
    assert counts.top_level_ops <= objective_profile.OPS_TARGET
    assert counts.syncs <= objective_profile.SYNCS_TARGET

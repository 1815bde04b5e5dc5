"""Where the time of one pretraining step goes: ResNet-50 encoder vs the graph-matching objective.

``python -m benchmarks.step_breakdown [--quick]`` runs, at the setting of issue 7 (ResNet-50, 224 x 224 views,
batch 32, graphs of 16 images, lambda 80, 1 and 2 IMLE samples), interleaved and repeated:

- the encoder step: encoder + projector forward on both views and their backward, given the objective's
  gradients (what plain contrastive learning would cost too);
- the objective step: ``LVMMedLoss`` forward and backward on the (detached) encoder outputs, with its parts
  timed inside the same calls: kNN graphs, GCN, affinities (global, local, edge), the solver in the forward
  pass, the IMLE re-solve in the backward pass, and the rest (autograd through GCN and affinities, loss).

The overhead is the objective step's median time over the encoder step's median time, both from one run.
On CUDA both run on the GPU (float32; the bundle's trainer adds AMP there).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

import scripts.objective.lvmmed_loss as lvmmed_loss_module
from benchmarks.common import Report, Table, Target, default_device, interleaved_medians, machine_summary, synchronize
from scripts.networks.projector import ProjectionHead
from scripts.networks.resnet_encoder import ResNet50Encoder
from scripts.networks.ssl_network import LVMMedNetwork
from scripts.objective.geometry import crop_grid
from scripts.objective.lvmmed_loss import LVMMedLoss

__all__ = ["StepSetting", "run"]

OVERHEAD_TARGET = 0.10
PARTS = ("kNN graphs", "GCN", "affinities", "solver (forward)", "IMLE re-solve (backward)")


class StepSetting:
    """Sizes of the measured step."""

    def __init__(self, image_size: int, batch_size: int, graph_size: int, repeats: int) -> None:
        self.image_size, self.batch_size, self.graph_size, self.repeats = image_size, batch_size, graph_size, repeats
        self.num_neighbors = min(5, graph_size - 1)

    def describe(self) -> str:
        return (f"ResNet-50, {self.image_size}x{self.image_size}, batch {self.batch_size}, graphs of "
                f"{self.graph_size}, lambda 80, k={self.num_neighbors}")


ISSUE_SETTING = StepSetting(image_size=224, batch_size=32, graph_size=16, repeats=2)
QUICK_SETTING = StepSetting(image_size=32, batch_size=8, graph_size=4, repeats=1)


class _PartTimer:
    """Accumulates wall-clock seconds per named part; wraps callables so that each call is timed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str | Callable[[], str], function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize(self.device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize(self.device)
            self.seconds[name() if callable(name) else name] += time.perf_counter() - start
            return result

        return timed


@contextmanager
def _timed_parts(loss: LVMMedLoss, timer: _PartTimer) -> Iterator[None]:
    """Times the objective's parts inside its real forward and backward calls (patched, then restored)."""
    module = lvmmed_loss_module
    originals = {name: getattr(module, name) for name in ("knn_edges", "global_affinity", "edge_affinity")}
    solver, local = loss.solver, loss._local_affinity
    in_backward = [False]
    setattr(module, "knn_edges", timer.wrap("kNN graphs", originals["knn_edges"]))
    for name in ("global_affinity", "edge_affinity"):
        setattr(module, name, timer.wrap("affinities", originals[name]))
    loss._local_affinity = timer.wrap("affinities", local)  # type: ignore[method-assign]
    loss.solver = timer.wrap(lambda: PARTS[4] if in_backward[0] else PARTS[3], solver)
    gcn_forward = None
    if loss.gcn is not None:
        gcn_forward = loss.gcn.forward
        loss.gcn.forward = timer.wrap("GCN", gcn_forward)  # type: ignore[method-assign]
    try:
        yield in_backward  # type: ignore[misc]
    finally:
        for name, function in originals.items():
            setattr(module, name, function)
        loss.solver = solver
        del loss._local_affinity
        if gcn_forward is not None:
            del loss.gcn.forward


def _inputs(setting: StepSetting, device: torch.device, generator: torch.Generator) -> dict[str, torch.Tensor]:
    size, batch = setting.image_size, setting.batch_size
    views = {f"view{i}": torch.randn(batch, 3, size, size, generator=generator).to(device) for i in (1, 2)}
    for i in (1, 2):
        corner = torch.rand(batch, 2, generator=generator) * 0.5
        views[f"box{i}"] = torch.cat([corner, corner + 0.5], 1).to(device)
        views[f"flip{i}"] = (torch.rand(batch, generator=generator) < 0.5).to(device)
    return views


def run(quick: bool = False, setting: StepSetting | None = None) -> Report:
    """Measures the step; ``quick`` uses a tiny setting (smoke test), not the issue's."""
    setting = setting or (QUICK_SETTING if quick else ISSUE_SETTING)
    device = default_device()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    network = LVMMedNetwork(ResNet50Encoder(), ProjectionHead(2048, 128)).to(device).train()
    losses = {s: LVMMedLoss(graph_size=setting.graph_size, num_neighbors=setting.num_neighbors, num_samples=s).to(device) for s in (1, 2)}
    data = _inputs(setting, device, generator)

    def encode(images: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features1, embeddings1 = network(data["view1"][:images])
        features2, embeddings2 = network(data["view2"][:images])
        grid1 = crop_grid(data["box1"], data["flip1"], features1.shape[2:])
        grid2 = crop_grid(data["box2"], data["flip2"], features2.shape[2:])
        return [embeddings1, embeddings2, features1, features2], [grid1, grid2]

    with torch.no_grad():
        outputs, grids = encode()
    leaves = [t.detach() for t in outputs]

    def objective_step(samples: int) -> list[torch.Tensor]:
        inputs = [t.clone().requires_grad_() for t in leaves]
        losses[samples](*inputs, *grids).backward()
        return [t.grad for t in inputs]  # type: ignore[misc]

    upstream = objective_step(1)

    def encoder_step() -> None:
        network.zero_grad(set_to_none=True)
        tensors, _ = encode()
        torch.autograd.backward(tensors, upstream)

    timers = {s: _PartTimer(device) for s in (1, 2)}
    calls = {s: 0 for s in (1, 2)}

    def timed_objective(samples: int) -> Callable[[], None]:
        def step() -> None:
            loss = losses[samples]
            with _timed_parts(loss, timers[samples]) as in_backward:
                inputs = [t.clone().requires_grad_() for t in leaves]
                value = loss(*inputs, *grids)
                in_backward[0] = True  # type: ignore[index]
                value.backward()
            calls[samples] += 1

        return step

    # warm-up outside the timed runs: allocator, kernels and torch-geometric's generated code; the encoder's on
    # two images only, since one step at the issue's setting takes minutes on a CPU
    tensors, _ = encode(2)
    sum(t.sum() for t in tensors).backward()
    for samples in (1, 2):
        objective_step(samples)
    candidates = {"encoder": encoder_step, "objective 1": timed_objective(1), "objective 2": timed_objective(2)}
    medians = interleaved_medians(candidates, repeats=setting.repeats, warmup=0, device=device)
    encoder = medians["encoder"]
    report = Report(f"Step breakdown: {setting.describe()}")
    report.notes.append(f"machine: {machine_summary(device)}")
    table = Table(
        f"{setting.describe()}; median of {setting.repeats} interleaved runs; parts: mean per objective step",
        ["part", "1 sample ms", "1 sample / encoder", "2 samples ms", "2 samples / encoder"],
    )
    table.add("encoder + projector fwd+bwd (2 views)", f"{1e3 * encoder:.1f}", "100%", f"{1e3 * encoder:.1f}", "100%")
    overheads = {}
    for samples in (1, 2):
        overheads[samples] = medians[f"objective {samples}"] / encoder
    for part in PARTS:
        cells = []
        for samples in (1, 2):
            seconds = timers[samples].seconds[part] / max(1, calls[samples])
            cells += [f"{1e3 * seconds:.1f}", f"{seconds / encoder:.2%}"]
        table.add(part, *cells)
    rest = []
    for samples in (1, 2):
        seconds = medians[f"objective {samples}"] - sum(timers[samples].seconds[p] for p in PARTS) / max(1, calls[samples])
        rest += [f"{1e3 * max(0.0, seconds):.1f}", f"{max(0.0, seconds) / encoder:.2%}"]
    table.add("rest (autograd of GCN/affinities, loss, checks)", *rest)
    table.add("objective total (graph+GCN+affinities+solver+IMLE)",
              f"{1e3 * medians['objective 1']:.1f}", f"{overheads[1]:.2%}",
              f"{1e3 * medians['objective 2']:.1f}", f"{overheads[2]:.2%}")
    report.tables.append(table)
    if quick:
        report.notes.append("quick smoke setting: the targets below are judged on the issue's setting only")
    for samples in (1, 2):
        report.targets.append(Target(
            f"objective overhead, {samples} IMLE sample{'s' if samples > 1 else ''} ({device.type})",
            f"{overheads[samples]:.2%} of the encoder step", f"<= {OVERHEAD_TARGET:.0%}",
            None if quick else overheads[samples] <= OVERHEAD_TARGET,
        ))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (64x64, batch 16, graphs of 8)")
    parser.add_argument("--repeats", type=int, default=ISSUE_SETTING.repeats)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setting = None
    if not args.quick:
        setting = StepSetting(224, 32, 16, repeats=args.repeats)
    print(run(args.quick, setting).render())


if __name__ == "__main__":
    main()

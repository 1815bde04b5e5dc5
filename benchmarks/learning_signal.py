"""What learning signal the LVM-Med objective gives, measured the same way for any of its settings.

``python -m benchmarks.learning_signal [--quick] [--compare KEY=VALUE[,KEY=VALUE...]] ... [--output FILE.json]``

Each setting is ``LVMMedLoss``'s keyword arguments over ``configs/pretrain.json``'s ``loss`` section: the shipped
defaults, the defaults before issue 21 (``BEFORE_ISSUE_21``: plain edge cosines), every switch of issue 21 on
(``ALL_FIXES``: also the degree-normalised edge term and the Gumbel scale relative to the spread) and each
``--compare`` given. For each, side by side, with NT-Xent on the same probes:

1. **Paths at init on the real pipeline**: ``configs/pretrain.json``'s encoder, projector, batched two-view
   augmentation and objective at initialisation, one step on a mixed batch (generated images of the SSL
   benchmark's modalities and classes) and one on a batch of near-duplicates (8 "adjacent slices" of each of 4
   images); the norm of the gradient that reaches the vertex embeddings through the edge term, divided by the one
   through the global vertex term (``LVMMedLoss.last_gradient_norms``), median over repeats.
2. **Does the gradient switch off?** 16 free embedding pairs (parameters, cosines about 0.97 at the start, as
   at a network's initialisation) trained by Adam with the objective (no local term): the share of steps whose
   objective gradient is exactly zero, and the final gap between the mean cosine of true pairs and of other
   pairs (NT-Xent: its gap after the same steps).
3. **Near-duplicates**: the gradient that one fixed upstream gradient on the edge affinities sends to two
   embeddings at distance d of each other (d = 1e-1 ... 1e-6), divided by the median over the other embeddings:
   it grows as 1 / d with plain edge cosines and stays bounded with softened ones (``edge_softening``).

The figures are those quoted in issue 21 and ``docs/objective.md``; ``--quick`` runs everything at tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser

from benchmarks.common import Table, machine_summary
from scripts.atomic_save import write_atomically
from scripts.data.ssl_benchmark import CLASSES, MODALITIES, draw_case
from scripts.objective.affinity import edge_affinity
from scripts.objective.baselines import SimCLRLoss
from scripts.objective.graph import incidence_rows, knn_edges, pad_edges
from scripts.objective.lvmmed_loss import LVMMedLoss
from scripts.pretraining.model import PretrainModel

__all__ = ["BEFORE_ISSUE_21", "ALL_FIXES", "parse_setting", "path_ratios", "free_embedding_probe", "near_duplicate_growth", "run",
           "main"]

REPOSITORY = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = REPOSITORY / "configs" / "pretrain.json"
BEFORE_ISSUE_21: dict[str, Any] = {
    "noise_reference": "absolute", "noise_scale": 0.1, "edge_normalisation": "none", "edge_softening": 0.0,
}
# every switch of issue 21 on: the degree-normalised edge term and the Gumbel scale relative to the spread
ALL_FIXES: dict[str, Any] = {"edge_normalisation": "degree", "noise_reference": "spread", "noise_scale": 2.0}
DISTANCES = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def parse_setting(text: str) -> dict[str, Any]:
    """``"edge_weight=0.5,noise=none"`` -> {"edge_weight": 0.5, "noise": "none"} (values read as JSON when they
    parse, else kept as strings)."""
    setting: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"--compare takes KEY=VALUE[,KEY=VALUE...], got {item!r} in {text!r}.")
        try:
            setting[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            setting[key.strip()] = value.strip()
    return setting


def _pipeline(setting: dict[str, Any], quick: bool, seed: int) -> tuple[PretrainModel, Any]:
    """``configs/pretrain.json``'s model (encoder, projector, objective with ``setting``) and batched augmentation."""
    parser = ConfigParser()
    parser.read_config(str(PRETRAIN_CONFIG))
    parser.update({"bundle_root": str(REPOSITORY), "image_size": 32 if quick else 64, "seed": seed})
    if quick:
        parser["encoder"] = {"_target_": "scripts.networks.resnet_features.ResNetFeatureEncoder",
                             "model_name": "resnet10", "in_channels": 3}
    for key, value in setting.items():
        parser[f"loss#{key}"] = value
    torch.manual_seed(seed)
    model = parser.get_parsed_content("model", instantiate=True)
    augment = parser.get_parsed_content("train#batch_augmentation", instantiate=True)
    return model, augment


def _images(kind: str, count: int, rng: np.random.RandomState) -> torch.Tensor:
    """(count, 1, 64, 64) grey images in [0, 1]: ``mixed`` draws every modality and class in turn, ``slices`` makes
    4 sources with count/4 near-duplicates each (small smooth changes, as adjacent slices of a volume)."""
    grey = lambda image: image if image.ndim == 2 else image.mean(-1)  # noqa: E731
    modalities, classes = sorted(MODALITIES), list(CLASSES)
    if kind == "mixed":
        images = [grey(draw_case(rng, modalities[i % len(modalities)], classes[i % len(classes)])[0])
                  for i in range(count)]
    else:
        images = []
        per_source = max(1, count // 4)
        for source in range(-(-count // per_source)):
            base = grey(draw_case(rng, modalities[source % len(modalities)], classes[source % len(classes)])[0])
            drift = rng.standard_normal(base.shape).astype(np.float32)
            images += [np.clip(base + 0.01 * step * drift, 0.0, 1.0) for step in range(per_source)]
        images = images[:count]
    return torch.from_numpy(np.stack(images)[:, None].astype(np.float32))


def path_ratios(setting: dict[str, Any], quick: bool = False, repeats: int = 3) -> dict[str, float]:
    """Median over ``repeats`` of the edge-to-vertex gradient-norm ratio at init (keys ``mixed``, ``slices``) and of
    the local path's norm relative to the vertex one (``local_mixed``); NaN where a path is off."""
    count = 8 if quick else 32
    ratios: dict[str, list[float]] = {"mixed": [], "slices": [], "local_mixed": []}
    for repeat in range(1 if quick else repeats):
        rng = np.random.RandomState(repeat)
        model, augment = _pipeline(setting, quick, seed=repeat)
        model.objective.track_gradient_paths = True
        for kind in ("mixed", "slices"):
            views = augment(_images(kind, count, rng))
            model.zero_grad()
            model(views["view1"], views["view2"], views["box1"], views["flip1"], views["box2"], views["flip2"]).backward()
            norms = {path: float(norm) for path, norm in model.objective.last_gradient_norms.items()}
            ratios[kind].append(norms["edge"] / norms["vertex"] if norms["vertex"] > 0 else float("nan"))
            if kind == "mixed":
                ratios["local_mixed"].append(norms["local"] / norms["vertex"] if norms["vertex"] > 0 else float("nan"))
    return {key: statistics.median(values) for key, values in ratios.items()}


def _cosine_gap(first: torch.Tensor, second: torch.Tensor) -> float:
    """Mean cosine of true pairs (row i with row i) minus the mean cosine of the other pairs."""
    cosines = torch.nn.functional.normalize(first, dim=1) @ torch.nn.functional.normalize(second, dim=1).T
    diagonal = cosines.diagonal().mean()
    others = (cosines.sum() - cosines.diagonal().sum()) / (cosines.numel() - cosines.shape[0])
    return float(diagonal - others)


def free_embedding_probe(
    setting: dict[str, Any] | None, steps: int = 60, pairs: int = 16, dim: int = 128, seed: int = 0
) -> dict[str, float]:
    """Trains ``pairs`` free embedding pairs with the objective of ``setting`` (None: NT-Xent); returns
    ``zero_gradient_share`` (NaN for NT-Xent), ``gap_start`` and ``gap_end`` (true-vs-other cosine gap)."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=generator)
    # cosines of about 0.97 between any two embeddings, as a network's outputs at initialisation
    base = common + 0.25 * torch.randn(pairs, dim, generator=generator)
    # each view as far from its image as the images are from each other: true pairs barely stand out at the start
    first = torch.nn.Parameter(base + 0.25 * torch.randn(pairs, dim, generator=generator))
    second = torch.nn.Parameter(base + 0.25 * torch.randn(pairs, dim, generator=generator))
    torch.manual_seed(seed)
    if setting is None:
        objective: torch.nn.Module = SimCLRLoss()
    else:
        objective = LVMMedLoss(embedding_dim=dim, local_similarity=False, **setting)
    optimizer = torch.optim.Adam([first, second, *objective.parameters()], lr=1e-2)
    gap_start = _cosine_gap(first.detach(), second.detach())
    zero_steps = 0
    for _ in range(steps):
        optimizer.zero_grad()
        objective(first, second).backward()
        if setting is not None:
            zero_steps += int(float(objective.last_gradient_is_zero) == 1.0)
        optimizer.step()
    return {"zero_gradient_share": zero_steps / steps if setting is not None else float("nan"),
            "gap_start": gap_start, "gap_end": _cosine_gap(first.detach(), second.detach())}


def near_duplicate_growth(setting: dict[str, Any], nodes: int = 16, dim: int = 128, seed: int = 0) -> dict[float, float]:
    """For each distance d of ``DISTANCES``: the largest gradient norm that a fixed random upstream gradient on the
    edge affinities (``setting``'s ``edge_softening``) sends to two embeddings d apart, over the median of the other
    embeddings' gradient norms."""
    softening = float(setting.get("edge_softening", LVMMedLoss().edge_softening))
    generator = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(2, nodes, dim, generator=generator), dim=-1)
    direction = torch.nn.functional.normalize(torch.randn(2, 1, dim, generator=generator), dim=-1)
    upstream = None
    growth = {}
    for distance in DISTANCES:
        embeddings = base.clone()
        embeddings[:, 1:2] = embeddings[:, 0:1] + distance * direction  # a near-duplicate of vertex 0 in each view
        embeddings.requires_grad_(True)
        adjacency = knn_edges(embeddings.detach(), 5)
        edges = pad_edges(adjacency, 2 * nodes * 5)
        counts = adjacency.sum((1, 2), keepdim=True, dtype=embeddings.dtype)
        pairwise = edge_affinity(embeddings, incidence_rows(edges, nodes), softening, counts)
        if upstream is None:
            upstream = torch.randn(pairwise.shape, generator=generator)
        (pairwise * upstream).sum().backward()
        norms = embeddings.grad.norm(dim=-1).flatten()  # (2 * nodes,)
        duplicates = torch.cat([norms[:2], norms[nodes:nodes + 2]])
        others = torch.cat([norms[2:nodes], norms[nodes + 2:]])
        growth[distance] = float(duplicates.max() / others.median())
    return growth


def run(settings: dict[str, dict[str, Any]], quick: bool = False) -> dict[str, dict[str, Any]]:
    """Every probe for every named setting, and NT-Xent on the free-embedding probe (key ``NT-Xent``)."""
    steps = 15 if quick else 60
    results: dict[str, dict[str, Any]] = {}
    for name, setting in settings.items():
        results[name] = {
            "setting": setting,
            "path_ratio": path_ratios(setting, quick),
            "free_embeddings": free_embedding_probe(setting, steps),
            "near_duplicate_growth": near_duplicate_growth(setting),
        }
    results["NT-Xent"] = {"setting": {"loss": "SimCLRLoss"}, "free_embeddings": free_embedding_probe(None, steps)}
    return results


def render(results: dict[str, dict[str, Any]]) -> str:
    """The figures as Markdown tables."""
    paths = Table("Gradient norm at the vertex embeddings through the edge term over the one through the vertex "
                  "term, at init on configs/pretrain.json's pipeline (median of repeats)",
                  ["setting", "edge / vertex, mixed batch", "edge / vertex, adjacent slices", "local / vertex, mixed"])
    free = Table("Free embedding pairs trained by Adam",
                 ["setting", "zero-gradient steps", "true-vs-other gap, start", "gap, end"])
    duplicates = Table("Near-duplicates: largest gradient on the two embeddings d apart over the median of the "
                       "others (edge affinities, fixed upstream gradient)",
                       ["setting", *(f"d = {d:g}" for d in DISTANCES)])
    for name, figures in results.items():
        embedding = figures["free_embeddings"]
        zero = embedding["zero_gradient_share"]
        free.add(name, "-" if np.isnan(zero) else f"{zero:.2f}", f"{embedding['gap_start']:.3f}", f"{embedding['gap_end']:.3f}")
        if "path_ratio" in figures:
            ratio = figures["path_ratio"]
            paths.add(name, f"{ratio['mixed']:.3g}", f"{ratio['slices']:.3g}", f"{ratio['local_mixed']:.3g}")
            duplicates.add(name, *(f"{figures['near_duplicate_growth'][d]:.3g}" for d in DISTANCES))
    return "\n\n".join([paths.render(), free.render(), duplicates.render()])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's run)")
    parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE...]",
                        help="another setting of LVMMedLoss's arguments over the defaults (repeatable)")
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings: dict[str, dict[str, Any]] = {"defaults": {}, "before issue 21": dict(BEFORE_ISSUE_21),
                                           "all issue-21 switches": dict(ALL_FIXES)}
    for text in args.compare:
        settings[text] = parse_setting(text)
    results = run(settings, args.quick)
    print(machine_summary(torch.device("cpu")))
    print(render(results))
    if args.output is not None:
        write_atomically(args.output, lambda path: path.write_text(json.dumps(results, indent=2, default=str)))


if __name__ == "__main__":
    main()

"""How the objective's design choices affect learning, on a toy problem that runs in minutes on CPU.

``python -m benchmarks.toy_matching_study`` trains a small MLP encoder with ``LVMMedLoss`` on
noisy views of random vectors (no feature maps, so the local affinity is off) for each setting and
prints the share of images matched to their own other view, averaged over the first and the last
20 steps. It is the measurement behind two defaults of ``LVMMedLoss``: the residual GCN and the
Gumbel scale; it also shows how lambda acts (``docs/objective.md``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from scripts.objective.lvmmed_loss import LVMMedLoss

SETTINGS: dict[str, dict] = {
    "defaults": {},
    "GCN of Eq. 1 without residual": {"gcn_residual": False},
    "absolute Gumbel scale 1.0": {"noise_reference": "absolute", "noise_scale": 1.0},
    "no second order": {"second_order": False},
    "no message passing": {"message_passing": False},
    "no Gumbel noise (margin 1)": {"noise": "none"},
    "lambda 0.1": {"lambda_": 0.1},
    "lambda 10": {"lambda_": 10.0},
    "lambda 10^4 (saturating)": {"lambda_": 1e4},
}


def train(settings: dict, steps: int, seed: int) -> tuple[float, float]:
    """(mean match accuracy over the first 20 steps, over the last 20 steps)."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128))
    loss_fn = LVMMedLoss(local_similarity=False, **settings)
    optimizer = torch.optim.Adam([*encoder.parameters(), *loss_fn.parameters()], lr=1e-3)
    data = torch.randn(512, 64)
    accuracies = []
    for _ in range(steps):
        images = data[torch.randint(0, len(data), (32,))]
        view1 = images + 0.8 * torch.randn_like(images)
        view2 = images + 0.8 * torch.randn_like(images)
        loss = loss_fn(encoder(view1), encoder(view2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        accuracies.append(float(loss_fn.last_match_accuracy))
    window = min(20, steps)
    return sum(accuracies[:window]) / window, sum(accuracies[-window:]) / window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'setting':40s} {'first 20':>9s} {'last 20':>9s}")
    for name, settings in SETTINGS.items():
        first, last = train(settings, args.steps, args.seed)
        print(f"{name:40s} {first:9.3f} {last:9.3f}")


if __name__ == "__main__":
    main()

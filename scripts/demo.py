"""Pretrains LVM-Med for a few steps on embedded synthetic images: ``python -m scripts.demo``.

A short, self-contained run of the objective on CPU (CUDA when present): it generates phantom
images, makes two augmented views per image, trains a ResNet-50 encoder, projector and GCN with the
graph-matching loss, prints the loss and how often the noise-free matching pairs each image's two
views (before and after training, on the same held-out views), and saves the encoder with
torchvision's keys.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.data.synthetic import create_test_image_2d
from monai.utils import set_determinism

from scripts.atomic_save import save_atomically
from scripts.networks.projector import ProjectionHead
from scripts.networks.resnet_encoder import ResNet50Encoder
from scripts.networks.ssl_network import LVMMedNetwork
from scripts.objective.geometry import crop_grid
from scripts.objective.lvmmed_loss import LVMMedLoss
from scripts.transforms.two_view import TwoViewAugmentd

logger = logging.getLogger("lvmmed.demo")


def phantom_images(count: int, size: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Grey (1, size, size) images in [0, 1]: random discs of varied number, size and noise."""
    state = np.random.RandomState(seed)
    images = []
    for _ in range(count):
        image, _ = create_test_image_2d(
            size, size, num_objs=int(state.randint(3, 15)), rad_max=int(state.randint(8, 30)),
            noise_max=float(state.uniform(0.0, 0.3)), channel_dim=0, random_state=state,
        )
        image = (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
        images.append({"image": image.astype(np.float32)})
    return images


def matching_batch(network: LVMMedNetwork, loss_fn: LVMMedLoss, batch: dict, device: torch.device) -> torch.Tensor:
    """Loss of one two-view batch; ``loss_fn.last_match_accuracy`` is updated."""
    features1, embeddings1 = network(batch["view1"].to(device))
    features2, embeddings2 = network(batch["view2"].to(device))
    grid1 = crop_grid(batch["box1"].to(device), batch["flip1"].to(device), features1.shape[2:])
    grid2 = crop_grid(batch["box2"].to(device), batch["flip2"].to(device), features2.shape[2:])
    return loss_fn(embeddings1, embeddings2, features1, features2, grid1, grid2)


@torch.no_grad()
def held_out_accuracy(network: LVMMedNetwork, loss_fn: LVMMedLoss, batches: list[dict], device: torch.device) -> float:
    """Share of held-out images matched to their own second view without Gumbel noise."""
    network.eval()
    noise, loss_fn.noise = loss_fn.noise, "none"
    accuracies = []
    for batch in batches:
        matching_batch(network, loss_fn, batch, device)
        accuracies.append(float(loss_fn.last_match_accuracy))
    loss_fn.noise = noise
    network.train()
    return float(np.mean(accuracies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64, help="side of each augmented view")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--output", type=Path, default=Path("runs/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-scale", type=float, default=0.1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    set_determinism(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    transform = TwoViewAugmentd(keys="image", spatial_size=args.image_size, drop_source=True)
    train = DataLoader(Dataset(phantom_images(256, 128, args.seed), transform), batch_size=args.batch_size,
                       shuffle=True, drop_last=True)
    held_out = list(DataLoader(Dataset(phantom_images(128, 128, args.seed + 1), transform), batch_size=args.batch_size))

    network = LVMMedNetwork(ResNet50Encoder(), ProjectionHead(2048, 128)).to(device)
    loss_fn = LVMMedLoss(noise_scale=args.noise_scale).to(device)
    optimizer = torch.optim.Adam([*network.parameters(), *loss_fn.parameters()], lr=args.learning_rate)
    before = held_out_accuracy(network, loss_fn, held_out, device)
    logger.info("device %s; held-out matching accuracy before training: %.3f", device, before)

    step, started = 0, time.perf_counter()
    while step < args.steps:
        for batch in train:
            loss = matching_batch(network, loss_fn, batch, device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 10 == 0 or step == 1:
                logger.info("step %d/%d  loss %.3f  train matching accuracy %.3f  (%.1f s)", step, args.steps,
                            loss.item(), float(loss_fn.last_match_accuracy), time.perf_counter() - started)
            if step == args.steps:
                break

    after = held_out_accuracy(network, loss_fn, held_out, device)
    logger.info("held-out matching accuracy: %.3f before training, %.3f after %d steps", before, after, step)
    encoder_path = args.output / "encoder_r50.pt"
    save_atomically(network.encoder.state_dict(), encoder_path)
    logger.info("encoder saved to %s (torchvision ResNet-50 keys, without fc)", encoder_path)


if __name__ == "__main__":
    main()

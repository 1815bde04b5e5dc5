"""Run by tests/test_distributed.py under torchrun: gradients of the objective under DDP.

Each rank takes its share of a fixed batch, builds its own graphs (graphs never span ranks), and
writes the DDP-averaged gradients of rank 0 to the file given as argument.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from scripts.networks.projector import ProjectionHead
from scripts.networks.sam_vit import SamViTEncoder
from scripts.networks.ssl_network import LVMMedNetwork
from scripts.objective.lvmmed_loss import LVMMedLoss
from scripts.pretraining.model import PretrainModel

NUM_IMAGES = 16


def build_model() -> PretrainModel:
    torch.manual_seed(0)
    encoder = SamViTEncoder(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, out_chans=16,
                            window_size=2, global_attn_indexes=(1,))
    loss = LVMMedLoss(embedding_dim=16, gcn_features=(16, 16), graph_size=8, num_neighbors=3, noise="none")
    return PretrainModel(LVMMedNetwork(encoder, ProjectionHead(16, 16)), loss)


def fixed_batch() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    view1 = torch.randn(NUM_IMAGES, 3, 32, 32, generator=generator)
    view2 = view1 + 3.0 * torch.randn(NUM_IMAGES, 3, 32, 32, generator=generator)  # hard: some mismatches
    corners = torch.rand(NUM_IMAGES, 2, generator=generator) * 0.3
    boxes = torch.cat([corners, corners + 0.7], dim=1)
    flips = torch.rand(NUM_IMAGES, generator=generator) > 0.5
    return view1, view2, boxes, flips, boxes.flip(0), ~flips


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def main(output: str) -> None:
    # a collective that waits longer than this fails with an error instead of hanging the test until its timeout
    dist.init_process_group(backend="gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DistributedDataParallel(build_model())
    share = slice(rank * NUM_IMAGES // world, (rank + 1) * NUM_IMAGES // world)
    loss = model(*(tensor[share] for tensor in fixed_batch()))
    loss.backward()
    if rank == 0:
        torch.save({name.removeprefix("module."): grad for name, grad in gradients(model).items()}, output)
    dist.barrier()  # gloo can hang in destroy when one rank leaves first
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

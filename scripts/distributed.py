"""The process group of the DDP configs, safe across torchrun's elastic restarts.

Under ``torchrun --max-restarts N`` the restarted workers meet in the rendezvous store of the agent, which still
holds the keys the killed workers wrote (their gloo/NCCL addresses): a restarted rank can read a dead peer's
address and fail with "connectFullMesh failed ... Connection refused", or wait for good on a group created
later (``tests/test_distributed_faults.py`` met both). Each attempt therefore gets its own key space, a
``PrefixStore`` named after ``TORCHELASTIC_RESTART_COUNT``; outside torchrun this is ``init_process_group()``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["init_distributed"]


def init_distributed(timeout: timedelta = timedelta(minutes=30)) -> None:
    """Joins the process group (NCCL with CUDA, gloo otherwise) from torchrun's environment, once.

    Args:
        timeout: how long a collective (and the rendezvous) waits for the other ranks.
    """
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # torchrun's agent hosts the store when it says so; otherwise rank 0 does (what env:// would do)
    hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=hosts,
                          timeout=timeout)
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank,
                            world_size=world_size, timeout=timeout)

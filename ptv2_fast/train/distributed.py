"""Data-parallel training under ``torchrun`` (DDP): one process per device, each running a shard of every
global batch; gradients are averaged by DDP, so a run over N processes follows the same trajectory as one
process over the same global batch (up to the order of floating-point sums).

``torchrun --nproc_per_node 8 -m ptv2_fast.cli train ...`` on one machine; add ``--nnodes``,
``--node_rank`` and ``--master_addr`` for several. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class DistState:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> DistState:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1), else a single process. The device:
    the local GPU when there is one, else the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if cuda else torch.device("cpu")
    if world <= 1:
        return DistState(device=device)
    created = False
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        created = True
    return DistState(dist.get_rank(), dist.get_world_size(), local_rank, device, created)


def wrap(model: torch.nn.Module, st: DistState) -> torch.nn.Module:
    """DDP over the trainable parameters (the bank and the head); the frozen encoder is replicated."""
    if st.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[st.device.index] if st.device.type == "cuda" else None)


def shard(batch: list, st: DistState) -> list | None:
    """This process's rows of a global batch, or None for a batch that does not split evenly (skipped by
    every process, so each step averages equal shares)."""
    if st.world == 1:
        return batch
    if len(batch) % st.world:
        return None
    return batch[st.rank::st.world]


def mean(value: torch.Tensor, st: DistState) -> float:
    """The mean of a scalar over the processes (the global batch's loss, for logging)."""
    if st.world == 1:
        return float(value.detach())
    v = value.detach().clone().float()
    dist.all_reduce(v)
    return float(v) / st.world


def teardown(st: DistState) -> None:
    if st.created and dist.is_initialized():
        dist.destroy_process_group()

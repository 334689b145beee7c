"""Data-parallel training under ``torchrun``: one process per device, each running a shard of every global
batch, with DDP (every process holds the whole model) or FSDP2 (``fully_shard``: each transformer block and
the rest of the model, frozen base included, sharded over the processes; the bank and head too).
Gradients are averaged either way, so a run over N processes follows the same trajectory as one process
over the same global batch (up to the order of floating-point sums): the loss is summed over each shard's
targets (rows, or tokens for token classification and causal LM) and divided by the global count, so shards
with more tokens weigh more, as they would in one process.

``torchrun --nproc_per_node 8 -m ptv2_fast.cli train ...`` on one machine; add ``--nnodes``,
``--node_rank`` and ``--master_addr`` for several. ``accelerate launch`` with a shipped config
(``config_path("accelerate_ddp")``) starts the same processes through torchrun. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist

CONFIGS = Path(__file__).parent / "configs"


def config_path(name: str) -> str:
    """The path of a shipped launcher config (accelerate_ddp, accelerate_fsdp_multinode, deepspeed_zero3)."""
    found = sorted(p for p in CONFIGS.iterdir() if p.stem == name or p.name == name)
    if not found:
        raise ValueError(f"no shipped config {name!r}; there are {sorted(p.stem for p in CONFIGS.iterdir())}")
    return str(found[0])


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


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: the ModuleList holding config.num_hidden_layers modules."""
    n = getattr(model.config, "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n:
            return list(m)
    raise ValueError("could not find the model's list of transformer blocks to shard")


def wrap(model: torch.nn.Module, st: DistState, fsdp: bool = False) -> torch.nn.Module:
    """The module to run: the model under DDP, or the model sharded in place with FSDP2 (build the optimizer
    afterwards: sharding replaces the parameters)."""
    if st.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[st.device.index] if st.device.type == "cuda" else None)


def full_state(module: torch.nn.Module) -> dict:
    """``module.state_dict()`` with sharded tensors gathered whole, on the CPU. A collective under FSDP2:
    every process must call it."""
    out = {}
    for k, v in module.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().contiguous().cpu()
    return out


def shard(batch: list, st: DistState) -> list | None:
    """This process's rows of a global batch, or None for a batch that does not split evenly (skipped by
    every process, so each step averages equal shares)."""
    if st.world == 1:
        return batch
    if len(batch) % st.world:
        return None
    return batch[st.rank::st.world]


def total(value: float, st: DistState) -> float:
    """The sum of a number over the processes (target counts and loss sums of a global batch)."""
    if st.world == 1:
        return float(value)
    v = torch.tensor(float(value), dtype=torch.float64, device=st.device)
    dist.all_reduce(v)
    return float(v)


def teardown(st: DistState) -> None:
    if st.created and dist.is_initialized():
        dist.destroy_process_group()

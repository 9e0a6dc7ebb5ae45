"""torch.distributed set-up for torchrun, and the few collectives the step needs.

Without torchrun's environment the run is a single process and every collective is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_preference: str = "auto") -> DistContext:
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_preference == "cuda" or (device_preference == "auto" and torch.cuda.is_available())
    if device_preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch_dist.is_initialized():
        # Step counters and metrics are CPU tensors, which NCCL cannot reduce: they go through gloo.
        torch_dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy); the identity in a single process."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return values
    values = values.clone()
    torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
    return values


def all_reduce_max(value: int) -> int:
    """The largest `value` over ranks; itself in a single process."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return int(t[0])


def shard_for_rank(items: list, ctx: DistContext) -> list:
    return items[ctx.rank :: ctx.world_size]


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def shutdown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()

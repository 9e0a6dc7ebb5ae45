"""torch.distributed set-up for torchrun, and the few collectives the step needs.

The trainer communicates only over the group it started itself, and only when torchrun gave it
more than one process. A library may start a default group of its own in a single process (vLLM's
in-process worker does: NCCL on a GPU, world size 1), and every collective here ignores it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

# The trainer's process group; None in a single process, where every collective is the identity.
_group: torch_dist.ProcessGroup | None = None


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
    global _group
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
    _group = None
    if world_size > 1:
        if not torch_dist.is_initialized():
            # Step counters and metrics are CPU tensors, which NCCL cannot reduce: they go through gloo.
            torch_dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo")
        elif torch_dist.get_world_size() != world_size:
            raise RuntimeError(
                f"a default process group of {torch_dist.get_world_size()} ranks already exists, but torchrun started {world_size}"
            )
        _group = torch_dist.group.WORLD
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def trainer_group() -> torch_dist.ProcessGroup | None:
    """The group the trainer's collectives run on; None in a single process."""
    return _group


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (of a copy); the identity in a single process."""
    return _all_reduce(values, torch_dist.ReduceOp.SUM)


def all_reduce_max_values(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (of a copy); the identity in a single process."""
    return _all_reduce(values, torch_dist.ReduceOp.MAX)


def _all_reduce(values: torch.Tensor, op) -> torch.Tensor:
    if _group is None:
        return values
    values = values.clone()
    torch_dist.all_reduce(values, op=op, group=_group)
    return values


def all_reduce_max(value: int) -> int:
    """The largest `value` over ranks; itself in a single process."""
    if _group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX, group=_group)
    return int(t[0])


def shard_for_rank(items: list, ctx: DistContext) -> list:
    return items[ctx.rank :: ctx.world_size]


def barrier() -> None:
    if _group is not None:
        torch_dist.barrier(group=_group)


def shutdown() -> None:
    global _group
    if _group is not None:
        torch_dist.destroy_process_group()
        _group = None

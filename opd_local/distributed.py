"""Data parallelism under torchrun: the trainer's process group, the few collectives the step needs, and the
student as DDP replicas or FSDP2 shards.

The trainer communicates only over the group it started itself, and only when torchrun gave it
more than one process. A library may start a default group of its own in a single process (vLLM's
in-process worker does: NCCL on a GPU, world size 1), and every collective here ignores it.

The fused loss and every scoring pass read the lm_head weight directly (the `[N, V]` logits are
never built), so they bypass the model's own forward. Every use of the weights therefore goes
through one wrapper forward, `ModelCall`: that is what DDP hooks its gradient sync on, and what
makes FSDP2 gather the parameters no submodule forward touches (embeddings, final norm, lm_head).
Gradients are summed over ranks, never averaged: the loss is already divided by the step's
global active-token count (docs/design.md, "The loss and its gradient"), so the sum is the gradient of the global loss.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from opd_local import models, output_heads
from opd_local.config import RunConfig, choices

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


class ModelCall(nn.Module):
    """`forward(fn, *args, **kwargs)` is `fn(model, *args, **kwargs)`: the root that DDP or FSDP2 wraps.

    Arguments are passed through untouched, so the loss and scoring functions keep their own signatures.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


@dataclass
class DistributedModel:
    """A model and the wrapper its computations run through.

    `module` is the transformers (or PEFT) model; under FSDP2 its parameters are DTensor shards, so
    anything that reads weights outside `__call__` goes through this module's functions.
    """

    module: nn.Module
    root: nn.Module  # ModelCall, DDP(ModelCall) or fully_shard(ModelCall)
    layout: str  # none, ddp or fsdp

    @property
    def sharded(self) -> bool:
        return self.layout == "fsdp"

    @property
    def config(self):
        return self.module.config

    def __call__(self, fn, *args, **kwargs):
        return self.root(fn, *args, **kwargs)

    def parameters(self):
        return self.module.parameters()

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def disable_adapter(self):
        return self.module.disable_adapter()


def as_distributed(model) -> DistributedModel:
    """A plain model as a single-process `DistributedModel`; one already wrapped as it is."""
    if isinstance(model, DistributedModel):
        return model
    return DistributedModel(model, ModelCall(model), "none")


def is_sharded(model) -> bool:
    return isinstance(model, DistributedModel) and model.sharded


def unwrap(model) -> nn.Module:
    return model.module if isinstance(model, DistributedModel) else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_layout(choice: str, num_params: int, ddp_max_params: int, world_size: int) -> str:
    """`run.parallel` with auto resolved: DDP replicas up to `ddp_max_params`, FSDP2 shards above."""
    layouts = choices(RunConfig, "parallel")
    if choice not in layouts:
        raise ValueError(f"run.parallel={choice!r}; choose one of {', '.join(layouts)}")
    if world_size == 1:
        return "none"  # one process holds and trains the whole model; there is nothing to split
    # run.parallel=none under torchrun is refused by `preflight.check_environment`
    if choice == "auto":
        return "ddp" if num_params <= ddp_max_params else "fsdp"
    return choice


def shard_model(
    model: nn.Module, device: torch.device, reshard_after_forward: bool, compute_dtype: torch.dtype | None = None
) -> DistributedModel:
    """`model` as FSDP2 shards over the trainer's ranks, one group per decoder layer and one for the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = models.decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder `layers` to shard; use run.parallel=ddp")
    mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
    # Gathers and compute in the precision policy's compute dtype over shards in their stored dtype,
    # gradients reduced in fp32.
    stored = next(model.parameters()).dtype
    mp_policy = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        if compute_dtype is not None and compute_dtype != stored
        else MixedPrecisionPolicy()
    )
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # The root holds what no layer owns: embeddings, final norm, lm_head (one group, so tied weights stay tied).
    root = fully_shard(ModelCall(model), mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    for module in root.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            # A plain sum: no division by the world size, and no PREMUL_SUM, which gloo lacks.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # FSDP2 picks its root on the first forward through it; doing that now, on every rank, lets
    # weight reads (push, checkpoint) come before any training forward.
    with torch.no_grad():
        root(lambda _: None)
    return DistributedModel(model, root, "fsdp")


def _sum_allreduce_hook(_state, bucket):
    fut = torch_dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_student(
    model: nn.Module,
    layout: str,
    device: torch.device,
    reshard_after_forward: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> DistributedModel:
    """The student wrapped for `layout` (from `resolve_layout`); parameters move to `device`.

    `compute_dtype` is what FSDP2 gathers the weights in; a replica runs under the caller's autocast.
    """
    if layout == "none":
        return as_distributed(model.to(device))
    if layout == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model.to(device)
        root = DistributedDataParallel(
            ModelCall(model),
            device_ids=[device.index] if device.type == "cuda" else None,
            # Buffers (rotary tables) are the same on every rank; syncing them would make every
            # forward a collective, including the main rank's evaluation passes.
            forward_sync_buffers=False,
            gradient_as_bucket_view=True,  # the gradients live in the all-reduce buckets: no second copy
        )
        root.register_comm_hook(None, _sum_allreduce_hook)  # DDP's default divides by the world size
        return DistributedModel(model, root, "ddp")
    if layout == "fsdp":
        return shard_model(model, device, reshard_after_forward, compute_dtype)
    raise ValueError(f"unknown layout {layout!r}")


@contextlib.contextmanager
def gradient_sync(student: DistributedModel, enabled: bool):
    """DDP all-reduces on the micro-batch that ends the step only; FSDP2 reduce-scatters every one, keeping grads sharded."""
    if student.layout == "ddp" and not enabled:
        with student.root.no_sync():
            yield
    else:
        yield


def call(model, fn, *args, **kwargs):
    """`fn(module, ...)` outside training: through the root only where the weights are sharded.

    Under FSDP2 every rank must make the same calls in the same order (each layer's forward is an
    all-gather); under DDP a forward through the wrapper would expect a backward, so replicas call directly.
    """
    if is_sharded(model):
        with torch.no_grad():
            return model(fn, *args, **kwargs)
    return fn(unwrap(model), *args, **kwargs)


def full_lm_head(model) -> torch.Tensor:
    """The lm_head weight in full on every rank (gathered once when sharded)."""
    if is_sharded(model):
        return call(model, lambda m: output_heads.lm_head_weight(m).detach().clone())
    return output_heads.lm_head_weight(unwrap(model)).detach()


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over all ranks' gradients; the norm before clipping, left on
    the device (reading it here would hold the host until the backward pass is done)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    from torch.distributed.tensor import DTensor

    # With sharded gradients the norm is a DTensor holding per-rank partial sums.
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def reshard(model) -> None:
    """Free the FSDP2 root's gathered weights: layers reshard after their own passes, the root keeps them after a forward."""
    if is_sharded(model):
        model.root.reshard()

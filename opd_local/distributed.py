"""Data parallelism under torchrun: the trainer's process group, the few collectives the step needs, and the
student as DDP replicas or FSDP2 shards, the teacher sharded or offloaded.

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
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from opd_local import models
from opd_local.packing import packing_plan, split_by_token_budget
from opd_local.scoring import CompletionScores, score_completions

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


LAYOUTS = ("auto", "none", "ddp", "fsdp")
TEACHER_PLACEMENTS = ("auto", "replica", "shard", "cpu", "disk")


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
    if choice not in LAYOUTS:
        raise ValueError(f"run.parallel={choice!r}; choose one of {', '.join(LAYOUTS)}")
    if world_size == 1:
        return "none"  # one process holds and trains the whole model; there is nothing to split
    if choice == "none":
        raise ValueError(f"run.parallel=none with {world_size} ranks: every rank would train alone; use ddp or fsdp")
    if choice == "auto":
        return "ddp" if num_params <= ddp_max_params else "fsdp"
    return choice


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, the units FSDP2 shards and gathers one at a time."""
    layers = models.decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder `layers` to shard; use run.parallel=ddp")
    return layers


def _fully_shard(
    model: nn.Module, device: torch.device, reshard_after_forward: bool, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
    # Gathers and compute in the precision policy's compute dtype over shards in their stored dtype,
    # gradients reduced in fp32.
    stored = next(model.parameters()).dtype
    mp_policy = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        if compute_dtype is not None and compute_dtype != stored
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
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
    return root


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
        return DistributedModel(model, _fully_shard(model, device, reshard_after_forward, compute_dtype), "fsdp")
    raise ValueError(f"unknown layout {layout!r}")


def resolve_teacher_placement(choice: str, student_layout: str, device: torch.device) -> str:
    if choice not in TEACHER_PLACEMENTS:
        raise ValueError(f"model.teacher_placement={choice!r}; choose one of {', '.join(TEACHER_PLACEMENTS)}")
    if choice == "auto":
        return "shard" if student_layout == "fsdp" else "replica"
    if choice == "shard" and student_layout != "fsdp":
        raise ValueError("model.teacher_placement=shard needs a sharded student (run.parallel=fsdp under torchrun)")
    if choice == "cpu" and device.type != "cuda":
        raise ValueError("model.teacher_placement=cpu offloads to host memory from a GPU; on CPU use replica (or disk)")
    return choice


def place_teacher(model: nn.Module, placement: str, device: torch.device, offload_dir: str, reshard_after_forward: bool = True):
    """The frozen teacher (loaded on the CPU) put where `placement` says.

    replica: whole on this rank's device. shard: FSDP2 over the ranks, gathered layer by layer.
    cpu / disk: accelerate keeps the decoder layers in host memory (or memory-mapped files under
    `offload_dir`) and moves each onto the device for its own forward; embeddings, final norm and
    lm_head stay on the device, because the scoring pass reads the lm_head weight directly.
    """
    if placement == "replica":
        return model.to(device)
    if placement == "shard":
        return DistributedModel(model, _fully_shard(model, device, reshard_after_forward), "fsdp")
    if placement in ("cpu", "disk"):
        from accelerate import dispatch_model

        shutil.rmtree(offload_dir, ignore_errors=True)  # accelerate would reuse files left by another teacher
        if placement == "cpu" and device.type == "cuda":
            # accelerate copies each layer to the GPU on every forward; from page-locked memory the
            # copy is a direct DMA, from pageable memory it goes through a staging buffer at a
            # fraction of the bandwidth. Pinned one tensor at a time: no second copy of the teacher.
            for layer in decoder_layers(model):
                for param in layer.parameters():
                    param.data = param.data.pin_memory()
        layer_ids = {id(layer) for layer in decoder_layers(model)}
        layer_names = [name for name, module in model.named_modules() if id(module) in layer_ids]
        main = device.index if device.type == "cuda" else "cpu"
        device_map: dict[str, str | int] = {name: placement for name in layer_names}
        for name, module in model.named_modules():
            inside = any(name.startswith(mapped + ".") for mapped in device_map) or name in device_map
            holds_layers = name == "" or any(layer.startswith(name + ".") for layer in layer_names)
            if not inside and not holds_layers:
                device_map[name] = main
        # Buffers outside any listed module (rotary tables) follow the main device.
        return dispatch_model(model, device_map=device_map, main_device=main, offload_dir=offload_dir or None)
    raise ValueError(f"unknown teacher placement {placement!r}")


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


def score_completions_distributed(
    model, prompts: list[list[int]], completions: list[list[int]], *, micro_batch_tokens: int, shared_prefix: bool = False, **kwargs
) -> CompletionScores:
    """`scoring.score_completions` on a plain, replicated or sharded model.

    `shared_prefix` applies to an unsharded model only. Sharded, each rank scores its own sequences
    in packed micro-batches, and ranks with fewer run one-token passes so that every rank makes the
    same number of forwards (each gathers every layer).
    """
    if not is_sharded(model):
        return score_completions(
            unwrap(model), prompts, completions, micro_batch_tokens=micro_batch_tokens, shared_prefix=shared_prefix, **kwargs
        )
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    # The plan's budget here too: each rank's forwards must be the ones counted for `rounds`.
    batches = split_by_token_budget(lengths, packing_plan(model.module).budget(micro_batch_tokens)) if prompts else []
    rounds = all_reduce_max(len(batches))
    parts = []
    for r in range(rounds):
        if r >= len(batches):
            call(model, score_completions, [[0]], [[0]], micro_batch_tokens=2, **kwargs)
            continue
        indices = batches[r]
        budget = sum(lengths[i] for i in indices)  # one packed forward, as score_completions would make
        out = call(
            model, score_completions, [prompts[i] for i in indices], [completions[i] for i in indices],
            micro_batch_tokens=budget, **kwargs,
        )
        parts.append((indices, out))
    return _reassemble(parts, len(prompts), kwargs.get("return_hidden", False))


def _reassemble(parts: list[tuple[list[int], CompletionScores]], n: int, with_hidden: bool) -> CompletionScores:
    scores: list = [None] * n
    hiddens: list = [None] * n
    for indices, out in parts:
        for j, i in enumerate(indices):
            scores[i] = out.logprobs[j]
            if with_hidden:
                hiddens[i] = out.hiddens[j]
    return CompletionScores(scores, hiddens if with_hidden else None)


def _fsdp_groups(model: DistributedModel) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """The FSDP2 root and the sharded layers, with their parameter-name prefixes in `merged_named_weights` naming."""
    from torch.distributed.fsdp import FSDPModule

    base = models.base_model(model.module)
    layers = [(name + ".", m) for name, m in base.named_modules() if isinstance(m, FSDPModule)]
    return model.root, layers


def gather_engine_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """`models.merged_named_weights` (full tensors, LoRA merged, tied weights under every name) for any placement.

    Sharded weights are gathered one layer at a time (collectives: every rank iterates to the end),
    and each tensor is a copy because the gathered memory is freed when the layer reshards.
    Offloaded layers are brought onto the device one at a time by their own accelerate hooks.
    """
    if is_sharded(model):
        root, layers = _fsdp_groups(model)
        root.unshard()
        try:
            groups = [(prefix, layer.unshard, layer.reshard) for prefix, layer in layers]
            for name, tensor in _engine_weights_by_layer(model.module, groups):
                yield name, tensor.clone()
        finally:
            root.reshard()
        return
    module = unwrap(model)
    if getattr(module, "hf_device_map", None):  # placed by accelerate's dispatch_model
        layer_ids = {id(layer) for layer in decoder_layers(module)}
        layers = [(name + ".", m) for name, m in module.named_modules() if id(m) in layer_ids]
        # The loaded tensors stay valid after the hooks put the modules back on `meta`.
        groups = [(prefix, lambda m=m: _run_hooks(m, "pre"), lambda m=m: _run_hooks(m, "post")) for prefix, m in layers]
        yield from _engine_weights_by_layer(module, groups)
        return
    yield from models.merged_named_weights(module)


def _run_hooks(layer: nn.Module, when: str) -> None:
    """Load (pre) or offload (post) a layer's weights with the accelerate hooks its forward would run."""
    for m in layer.modules():
        hook = getattr(m, "_hf_hook", None)
        if hook is None:
            continue
        if when == "pre":
            hook.pre_forward(m)
        else:
            hook.post_forward(m, None)


def _engine_weights_by_layer(module: nn.Module, groups) -> Iterator[tuple[str, torch.Tensor]]:
    """What lies outside every group first, then each group between its `load()` and `unload()`."""
    prefixes = tuple(prefix for prefix, _, _ in groups)
    yield from models.merged_named_weights(module, only=lambda n: not n.startswith(prefixes))
    for prefix, load, unload in groups:
        load()
        try:
            yield from models.merged_named_weights(module, only=lambda n, p=prefix: n.startswith(p))
        finally:
            unload()


def engine_weight_shapes(model) -> dict[str, tuple[int, ...]]:
    """The names and full shapes `gather_engine_weights` would give, without gathering anything."""
    return models.merged_weight_shapes(unwrap(model))


def full_lm_head(model) -> torch.Tensor:
    """The lm_head weight in full on every rank (gathered once when sharded)."""
    if is_sharded(model):
        return call(model, lambda m: models.lm_head_weight(m).detach().clone())
    return models.lm_head_weight(unwrap(model)).detach()


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

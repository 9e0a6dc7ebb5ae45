"""The student's optimizer (docs/design.md, "The step", 7): AdamW with a linear warm-up, and its one step in one
place: clip the gradient, step or skip, advance the schedule, clear the gradients.

A step whose loss or gradient norm is not finite, or whose norm passes `optim.skip_grad_norm`, is skipped and
counted; `DivergenceGuard` stops the run after `optim.max_skipped_steps` of them in a row.
"""

from __future__ import annotations

import math
import warnings

import torch

from opd_local import distributed
from opd_local.config import OptimConfig


def build_optimizer(student, optim: OptimConfig):
    """AdamW over the trainable parameters and its warm-up schedule."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    params = [p for p in student.parameters() if p.requires_grad]
    # torch's fused AdamW: one update kernel per step instead of a chain of `foreach` ops (on CPU about
    # 5-10x faster at 135M parameters). Sharded (DTensor) parameters keep torch's own choice.
    fused = bool(params) and all(
        type(p.data) is torch.Tensor and p.device.type in _get_fused_kernels_supported_devices()
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        for p in params
    )
    optimizer = torch.optim.AdamW(
        params,
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=fused or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (optim.warmup_steps + 1)))
    return optimizer, scheduler


def apply_optim_config(optimizer, scheduler, optim: OptimConfig) -> None:
    """Set the AdamW settings of `optim` on a restored optimizer and scheduler.

    Their state dicts carry the saved run's learning rate and betas, which would silently win over
    the ones the resumed run was given; the warm-up is the scheduler's lambda, built from `optim` already.
    """
    for group in optimizer.param_groups:
        group.update(initial_lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay)
    scheduler.base_lrs = [optim.lr] * len(optimizer.param_groups)
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = optim.lr * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def optimizer_step(student, optimizer, scheduler, optim: OptimConfig, accumulated) -> dict[str, float]:
    """Step 7 on the gradients `training.accumulate_gradients` left (`accumulated` is its `AccumulatedLoss`):
    clip, AdamW (or skip), schedule, zero. Every rank reads the same reduced values, so all step or skip together."""
    if accumulated.active_tokens == 0:  # every rollout dropped on every rank: keep the weights
        metrics = {"optim/skipped": 1.0}
    else:
        params = [p for p in student.parameters() if p.requires_grad]
        grad_norm = distributed.clip_grad_norm_(params, optim.grad_clip if optim.grad_clip > 0 else float("inf"))
        # One host read for the sums and the norm, before the update: a non-finite or absurd loss or
        # gradient norm must not reach the weights.
        sums, grad_norm = torch.cat([accumulated.sums, grad_norm.double().reshape(1)]).cpu().split(2)
        totals = distributed.all_reduce_sum(sums)
        metrics = accumulated.metrics(totals)
        loss, norm = metrics["opd/loss"], float(grad_norm)
        diverged = not (math.isfinite(loss) and math.isfinite(norm)) or (0 < optim.skip_grad_norm < norm)
        if not diverged:
            optimizer.step()
        metrics.update({"optim/grad_norm": norm, "optim/skipped": float(diverged), "optim/diverged": float(diverged)})
    with warnings.catch_warnings():  # a skipped step still counts in the schedule: torch warns of that
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)  # before the push: on a GPU the engine wakes into this memory
    return metrics


class TrainingDiverged(RuntimeError):
    pass


class DivergenceGuard:
    """Stops the run after `optim.max_skipped_steps` steps in a row were skipped for a non-finite or
    absurd loss or gradient norm: the weights no longer move, so later steps would only repeat it."""

    def __init__(self, optim: OptimConfig):
        self.optim = optim
        self.in_a_row = 0

    def check(self, step: int, metrics: dict[str, float]) -> None:
        self.in_a_row = self.in_a_row + 1 if metrics.get("optim/diverged") else 0
        if self.in_a_row >= self.optim.max_skipped_steps:
            raise TrainingDiverged(
                f"training diverged: steps {step - self.in_a_row + 1}-{step} were skipped, each for a non-finite or absurd "
                f"loss or gradient norm (step {step}: loss {metrics.get('opd/loss'):.4g}, gradient norm "
                f"{metrics.get('optim/grad_norm'):.4g}, optim.skip_grad_norm={self.optim.skip_grad_norm:g}); "
                f"lower --optim.lr (now {self.optim.lr:g}) or look for bad rows"
            )

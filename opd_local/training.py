"""The student's part of a step (docs/design.md, "The step", 5-7): packed micro-batches of the kept
rollouts, the fused loss accumulated over them, clipping and one AdamW step.

By default each group's completions follow one copy of their student prompt (`packing.pack_groups`):
P + K*C tokens through the student instead of K*(P+C). The prompt's hidden states then serve all K
completions, so its gradient is the sum of their K contributions, as with K copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_local import distributed
from opd_local.attention import supports_shared_prefix
from opd_local.config import Config
from opd_local.loss import opd_micro_batch_loss, token_divisors
from opd_local.optimizer import optimizer_step
from opd_local.packing import PackedBatch, pack_groups, packing_plan, split_groups_by_token_budget, to_device
from opd_local.precision import PrecisionPolicy
from opd_local.rollouts import Rollout


@dataclass
class PackedMicroBatch:
    """One training pass: the packed row and, per active token in its order, what the loss compares with."""

    row: PackedBatch  # input_ids, position_ids (the attention layout), logit positions, targets, completion lengths
    teacher_lp: torch.Tensor  # [N_active] fp32
    rollout_lp: torch.Tensor  # [N_active] fp32
    teacher_hidden: torch.Tensor | None  # [N_active, H_t], full-vocabulary objectives only
    rollouts: list[Rollout]  # in the row's order; empty for an idle pass

    @property
    def completion_lengths(self) -> list[int]:
        return self.row.completion_lengths


def plan_micro_batches(kept: list[Rollout], budget: int, shared_prefix: bool) -> list[list[list[Rollout]]]:
    """Micro-batches of segments, each segment one prompt and the rollouts packed behind it.

    Shared, a segment holds the completions of one student prompt (a group's K samples, wherever they
    sit in `kept`), cut into parts only when it exceeds `budget` (`split_groups_by_token_budget`);
    else every rollout is its own segment.
    """
    if shared_prefix:
        by_prompt: dict[tuple[int, ...], list[Rollout]] = {}
        for r in kept:
            by_prompt.setdefault(tuple(r.group.student_prompt_ids), []).append(r)
        groups = list(by_prompt.values())
    else:
        groups = [[r] for r in kept]
    plan = split_groups_by_token_budget(
        [len(g[0].group.student_prompt_ids) for g in groups],
        [[len(r.completion_ids) for r in g] for g in groups],
        budget,
    )
    return [[[groups[g][k] for k in part] for g, part in batch] for batch in plan]


def pack_micro_batch(segments: list[list[Rollout]], device: torch.device, teacher_head=None) -> PackedMicroBatch:
    """The segments as one packed row on `device`, with their per-token teacher and rollout values.

    No segments (an idle pass) gives one placeholder token, so that the pass still runs every layer.
    """
    if not segments:
        zero = torch.zeros(1, device=device)
        hidden = None if teacher_head is None else torch.zeros(1, teacher_head.shape[1], device=device)
        return PackedMicroBatch(pack_groups([([0], [[0]])]).to(device), zero, zero, hidden, [])
    rollouts = [r for segment in segments for r in segment]
    row = pack_groups([(segment[0].group.student_prompt_ids, [r.completion_ids for r in segment]) for segment in segments])
    return PackedMicroBatch(
        row=row.to(device),
        teacher_lp=to_device(torch.cat([r.teacher_lp for r in rollouts]), device),
        rollout_lp=to_device(torch.cat([r.rollout_lp for r in rollouts]), device),
        teacher_hidden=torch.cat([r.teacher_hidden for r in rollouts]) if teacher_head is not None else None,
        rollouts=rollouts,
    )


@dataclass
class AccumulatedLoss:
    """What the step's micro-batches summed, still on the device: read once, with the gradient norm, by
    `optimizer.optimizer_step`, since a read per micro-batch would hold the host until its kernels ran."""

    sums: torch.Tensor  # fp64 [2]: this rank's loss and sum |student_lp - rollout_lp|
    active_tokens: float  # the step's active tokens, over every rank (0: nothing to learn from)

    def metrics(self, totals: torch.Tensor) -> dict[str, float]:
        """The loss and the mean trainer/sampler log-prob mismatch from `totals`, the sums reduced over ranks."""
        return {"opd/loss": float(totals[0]), "rollout/trainer_lp_mismatch": float(totals[1]) / max(self.active_tokens, 1.0)}

    def reduced(self) -> dict[str, float]:
        """`metrics` with the sums read and reduced here (a host read of its own; the step's is `optimizer_step`'s)."""
        return self.metrics(distributed.all_reduce_sum(self.sums.cpu()))


def accumulate_gradients(
    student, kept: list[Rollout], cfg: Config, precision: PrecisionPolicy, micro_batch_tokens: int, teacher_head=None,
    teacher_logit_transform: tuple[float, float | None] = (1.0, None),
) -> AccumulatedLoss:
    """Steps 5-6: the fused loss's gradient, accumulated over token-budget micro-batches into `.grad`."""
    local = torch.tensor([sum(len(r.completion_ids) for r in kept), len(kept)], dtype=torch.float64)
    n_active, n_sequences = (float(x) for x in distributed.all_reduce_sum(local))
    student = distributed.as_distributed(student)
    device = next(student.parameters()).device
    # loss, sum |student_lp - rollout_lp|
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    if n_active == 0:  # every rollout dropped on every rank: nothing to learn from
        return AccumulatedLoss(sums, 0.0)
    plan = packing_plan(distributed.unwrap(student))  # what the start-up check proved (`packing_check`)
    shared = cfg.model.student_shared_prefix and plan.shared_prompt and supports_shared_prefix(student.config)
    micro_batches = plan_micro_batches(kept, plan.budget(micro_batch_tokens), shared)
    # Every rank makes as many passes as the busiest one: FSDP2 gathers and reduces in every pass,
    # DDP sums gradients in the last. A rank out of work runs idle passes that add nothing.
    passes = distributed.all_reduce_max(len(micro_batches))
    for i in range(passes):
        batch = pack_micro_batch(micro_batches[i] if i < len(micro_batches) else [], device, teacher_head)
        divisors = token_divisors(batch.completion_lengths, cfg.loss, n_active, n_sequences)
        divisors = to_device(divisors, device) if isinstance(divisors, torch.Tensor) else divisors
        with distributed.gradient_sync(student, enabled=i == passes - 1):
            with precision.autocast():
                # Through the wrapper's forward (distributed.ModelCall), which runs the loss function on the
                # model: that forward is what DDP hooks its gradient sync on and FSDP2 gathers weights for.
                loss, student_lp = student(
                    opd_micro_batch_loss,
                    batch=batch.row,
                    teacher_lp=batch.teacher_lp,
                    rollout_lp=batch.rollout_lp,
                    loss_cfg=cfg.loss,
                    normalizer=divisors,
                    temperature=cfg.rollout.temperature,
                    teacher_hidden=batch.teacher_hidden,
                    teacher_head=teacher_head,
                    compute_dtype=precision.compute,
                    teacher_logit_transform=teacher_logit_transform,
                )
            (loss if batch.rollouts else 0.0 * loss).backward()
        if batch.rollouts:
            sums += torch.stack([loss.detach(), (student_lp.detach() - batch.rollout_lp).abs().sum()]).double()
    return AccumulatedLoss(sums, n_active)


def train_on_rollouts(
    student, optimizer, scheduler, kept: list[Rollout], cfg: Config, precision: PrecisionPolicy, micro_batch_tokens: int,
    teacher_head=None, teacher_logit_transform: tuple[float, float | None] = (1.0, None),
) -> dict[str, float]:
    """Steps 5-7: the accumulated gradient, then the optimizer's one step (clip, step or skip, schedule, zero)."""
    accumulated = accumulate_gradients(student, kept, cfg, precision, micro_batch_tokens, teacher_head, teacher_logit_transform)
    return optimizer_step(student, optimizer, scheduler, cfg.optim, accumulated)

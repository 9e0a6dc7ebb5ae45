"""Rollouts of one step, their validation (docs/design.md, "The step", 3) and the group accounting.

A completion with a missing, extra or non-finite logprob on an active token is dropped,
never padded. Every drawn group ends up in exactly one of `sampled` (kept at least one
completion), `filtered` (dropped by policy) or `failed` (malformed engine or teacher output).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from opd_local import distributed
from opd_local.data import PromptGroup
from opd_local.samplers import Completion

# Reasons that mean an engine or the teacher returned bad numbers; anything else is a filter.
FAILURE_REASONS = frozenset({"rollout_lp_count", "rollout_lp_nonfinite", "teacher_lp_count", "teacher_lp_nonfinite"})
# Every reason a completion is dropped for, each logged as rollout/dropped_<reason>.
DROP_REASONS = ("empty_completion", "past_teacher_rows", *sorted(FAILURE_REASONS))


@dataclass
class Rollout:
    group_index: int  # position of its prompt group among the step's groups
    group: PromptGroup
    completion_ids: list[int]
    rollout_lp: torch.Tensor  # [C] fp32
    finish_reason: str
    teacher_lp: torch.Tensor | None = None  # [C] fp32, filled by the teacher
    teacher_hidden: torch.Tensor | None = None  # [C, H], full-vocabulary objectives only
    drop_reason: str | None = None

    @property
    def kept(self) -> bool:
        return self.drop_reason is None

    def record_teacher_scores(self, teacher_lp: torch.Tensor, teacher_hidden: torch.Tensor | None = None) -> None:
        """Store the teacher's logprobs (and hidden states), dropping the rollout when they are unusable.

        The logprobs come from the same hidden states, so a non-finite hidden state shows up in them.
        """
        self.teacher_lp = teacher_lp
        self.teacher_hidden = teacher_hidden
        self.drop_reason = _logprob_problem(teacher_lp, len(self.completion_ids), "teacher_lp")


@dataclass
class GroupCounts:
    sampled: int = 0
    filtered: int = 0
    failed: int = 0
    drop_reasons: Counter = field(default_factory=Counter)


def _logprob_problem(values: torch.Tensor, num_tokens: int, prefix: str) -> str | None:
    if values.numel() != num_tokens:
        return f"{prefix}_count"
    if not bool(torch.isfinite(values).all()):
        return f"{prefix}_nonfinite"
    return None


def drop_past_teacher_rows(rollouts: list[Rollout], teacher_rows: int) -> None:
    """Drop a completion holding a token id the teacher has no row for.

    A student head padded wider than the teacher's (one tokenizer, `output_heads.check_output_heads` lets it
    through for sampled_rkl) has rows past every token of the tokenizer; neither engine masks them, so the
    student can sample one, rarely, and the teacher could not score it. Counted, as a filter.
    """
    for rollout in rollouts:
        if rollout.kept and max(rollout.completion_ids, default=-1) >= teacher_rows:
            rollout.drop_reason = "past_teacher_rows"


def build_rollouts(groups: list[PromptGroup], completions: list[list[Completion]]) -> list[Rollout]:
    """Flatten the sampler's output and mark completions whose rollout logprobs are unusable."""
    if len(groups) != len(completions):
        raise RuntimeError(f"sampler returned {len(completions)} completion groups for {len(groups)} prompts")
    rollouts = []
    for group_index, (group, samples) in enumerate(zip(groups, completions)):
        for sample in samples:
            rollout_lp = torch.tensor(
                [math.nan if v is None else v for v in sample.logprobs], dtype=torch.float32
            )
            rollout = Rollout(group_index, group, list(sample.token_ids), rollout_lp, sample.finish_reason)
            if not rollout.completion_ids:
                rollout.drop_reason = "empty_completion"
            else:
                rollout.drop_reason = _logprob_problem(rollout_lp, len(rollout.completion_ids), "rollout_lp")
            rollouts.append(rollout)
    return rollouts


def count_groups(num_groups: int, rollouts: list[Rollout]) -> GroupCounts:
    counts = GroupCounts()
    by_group: dict[int, list[Rollout]] = {i: [] for i in range(num_groups)}
    for rollout in rollouts:
        by_group[rollout.group_index].append(rollout)
        if not rollout.kept:
            counts.drop_reasons[rollout.drop_reason] += 1
    for members in by_group.values():
        if any(r.kept for r in members):
            counts.sampled += 1
        elif any(r.drop_reason in FAILURE_REASONS for r in members):
            counts.failed += 1
        else:
            counts.filtered += 1
    return counts


def rollout_metrics(rollouts: list[Rollout], kept: list[Rollout], num_groups: int) -> dict[str, float]:
    """The step's rollout and group counts, summed over ranks."""
    counts = count_groups(num_groups, rollouts)
    rkl_sum = sum(float((r.rollout_lp - r.teacher_lp).sum()) for r in kept)
    local = [
        sum(len(r.completion_ids) for r in kept),
        rkl_sum,
        counts.sampled,
        counts.filtered,
        counts.failed,
        len(rollouts),
        len(kept),
        sum(r.finish_reason == "stop" for r in kept),
        num_groups,
        *(counts.drop_reasons[reason] for reason in DROP_REASONS),
    ]
    totals = [float(v) for v in distributed.all_reduce_sum(torch.tensor(local, dtype=torch.float64))]
    active, rkl_sum, sampled, filtered, failed, drawn, n_kept, stopped, groups_drawn = totals[: -len(DROP_REASONS)]
    by_reason = dict(zip(DROP_REASONS, totals[-len(DROP_REASONS):]))
    return {
        "opd/sampled_reverse_kl": rkl_sum / active if active else float("nan"),
        "opd/active_tokens": active,
        "groups/sampled": sampled,
        "groups/filtered": filtered,
        "groups/failed": failed,
        "groups/drawn": groups_drawn,
        "rollout/completions": drawn,
        "rollout/dropped_completions": drawn - n_kept,
        **{f"rollout/dropped_{reason}": count for reason, count in by_reason.items()},
        "rollout/completion_len_mean": active / n_kept if n_kept else 0.0,
        "rollout/stop_fraction": stopped / n_kept if n_kept else 0.0,
    }

"""Rollout validation: nothing malformed reaches the loss, and every group is accounted for."""

import math

import torch

from opd_local.data import PromptGroup
from opd_local.progress import RunTotals
from opd_local.rollouts import build_rollouts, count_groups, drop_past_teacher_rows, rollout_metrics
from opd_local.rows import PrivilegedRow
from opd_local.samplers import Completion


def _group(i):
    row = PrivilegedRow(f"row#{i}", ({"role": "user", "content": "q"},), ({"role": "user", "content": "q+"},), "1", "s")
    return PromptGroup(row, [1, 2], [1, 2, 3])


def test_malformed_completions_are_dropped_and_groups_counted():
    groups = [_group(i) for i in range(4)]
    completions = [
        [Completion([5, 6], [-0.1, -0.2], "stop"), Completion([5], [math.nan], "stop")],  # one good, one NaN
        [Completion([5, 6], [-0.1], "length")],  # count mismatch only -> failed
        [Completion([], [], "length")],  # empty only -> filtered
        [Completion([7, 8, 9], [-1.0, -2.0, -3.0], "length")],  # good, but the teacher returns inf
    ]
    rollouts = build_rollouts(groups, completions)
    assert [r.drop_reason for r in rollouts] == [None, "rollout_lp_nonfinite", "rollout_lp_count", "empty_completion", None]
    rollouts[0].record_teacher_scores(torch.tensor([-0.5, -0.5]))
    rollouts[4].record_teacher_scores(torch.tensor([-1.0, -math.inf, -1.0]))
    assert rollouts[4].drop_reason == "teacher_lp_nonfinite"
    assert torch.equal(rollouts[0].teacher_lp, torch.tensor([-0.5, -0.5]))
    counts = count_groups(len(groups), rollouts)
    assert (counts.sampled, counts.filtered, counts.failed) == (1, 1, 2)
    assert counts.sampled + counts.filtered + counts.failed == len(groups)
    assert counts.drop_reasons["rollout_lp_count"] == 1

    metrics = rollout_metrics(rollouts, [r for r in rollouts if r.kept], len(groups))
    assert (metrics["rollout/completions"], metrics["rollout/dropped_completions"], metrics["opd/active_tokens"]) == (5, 4, 2)
    # each dropped completion under its reason, so a NaN from the engine is told apart from an empty reply
    assert {k: v for k, v in metrics.items() if k.startswith("rollout/dropped_") and k != "rollout/dropped_completions"} == {
        "rollout/dropped_empty_completion": 1, "rollout/dropped_rollout_lp_count": 1, "rollout/dropped_rollout_lp_nonfinite": 1,
        "rollout/dropped_teacher_lp_count": 0, "rollout/dropped_teacher_lp_nonfinite": 1, "rollout/dropped_past_teacher_rows": 0,
    }


def test_a_completion_past_the_teachers_rows_is_dropped_as_a_filter():
    groups = [_group(0), _group(1)]
    completions = [[Completion([5, 99], [-0.1, -0.2], "stop")], [Completion([5, 100], [-0.1, -0.2], "stop")]]
    rollouts = build_rollouts(groups, completions)
    drop_past_teacher_rows(rollouts, 100)  # ids 0..99 have a teacher row
    assert [r.drop_reason for r in rollouts] == [None, "past_teacher_rows"]
    counts = count_groups(len(groups), rollouts)
    assert (counts.sampled, counts.filtered, counts.failed) == (1, 1, 0)
    rollouts[0].record_teacher_scores(torch.tensor([-0.5, -0.5]))
    metrics = rollout_metrics(rollouts, [r for r in rollouts if r.kept], len(groups))
    assert metrics["rollout/dropped_past_teacher_rows"] == 1


def test_run_totals_add_up_steps_and_resume_from_a_checkpoint_dict():
    step = {"groups/sampled": 3.0, "groups/filtered": 1.0, "groups/failed": 0.0, "opd/active_tokens": 40.0}
    totals = RunTotals()
    totals.add(step)
    after_two = totals.add({**step, "groups/failed": 2.0})
    assert after_two == {
        "groups/sampled_total": 6, "groups/filtered_total": 2, "groups/failed_total": 2, "opd/active_tokens_total": 80,
    }
    # A checkpoint's progress holds the totals as this dict of metric names.
    resumed = RunTotals()
    resumed.load_state_dict(dict(after_two))
    assert resumed.add(step)["opd/active_tokens_total"] == 120 and totals.state_dict() == after_two

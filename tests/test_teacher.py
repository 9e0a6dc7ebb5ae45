"""The teacher scores the kept rollouts behind the prompt its context names, and cleans up its offload folder."""

import math

import pytest
import torch

from opd_local.config import ModelConfig
from opd_local.data import PromptGroup
from opd_local.models import load_causal_lm
from opd_local.rollouts import build_rollouts
from opd_local.rows import PrivilegedRow
from opd_local.samplers import Completion
from opd_local.scoring import score_completions
from opd_local.teacher import Teacher


def _groups(tokenizer):
    groups = []
    for i, (question, hint) in enumerate([("What is 2+3?", "2 + 3 = 5"), ("What is 4*4?", "4 * 4 = 16")]):
        student = [{"role": "user", "content": question}]
        teacher = [{"role": "user", "content": f"{question}\n{hint}"}]
        row = PrivilegedRow(f"r#{i}", tuple(student), tuple(teacher), None, hint)
        ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True)["input_ids"] for m in (student, teacher)]
        groups.append(PromptGroup(row, *ids))
    return groups


@pytest.mark.parametrize("context", ["privileged", "plain"])
def test_score_uses_the_context_prompt_and_returns_the_kept(tiny_teacher_dir, tokenizer, context):
    model = load_causal_lm(tiny_teacher_dir, ModelConfig(), torch.float64, torch.device("cpu"))
    groups = _groups(tokenizer)
    completions = [
        [Completion([11, 12, 13], [-1.0] * 3, "stop"), Completion([14], [math.nan], "stop")],  # the second is dropped
        [Completion([15, 16], [-1.0] * 2, "length")],
    ]
    rollouts = build_rollouts(groups, completions)
    kept = Teacher(model, micro_batch_tokens=4096, context=context).score(rollouts)
    assert kept == [rollouts[0], rollouts[2]]
    assert rollouts[1].teacher_lp is None and rollouts[1].drop_reason == "rollout_lp_nonfinite"
    for rollout in kept:
        prompt = rollout.group.teacher_prompt_ids if context == "privileged" else rollout.group.student_prompt_ids
        (want,) = score_completions(model, [prompt], [rollout.completion_ids], micro_batch_tokens=4096).logprobs
        torch.testing.assert_close(rollout.teacher_lp, want, rtol=0, atol=1e-12)
        assert rollout.teacher_hidden is None
    other = groups[0].student_prompt_ids if context == "privileged" else groups[0].teacher_prompt_ids
    (elsewhere,) = score_completions(model, [other], [rollouts[0].completion_ids], micro_batch_tokens=4096).logprobs
    assert not torch.allclose(rollouts[0].teacher_lp, elsewhere)


def test_a_completion_holding_a_token_the_teacher_has_no_row_for_is_dropped_not_scored(tiny_teacher_dir, tokenizer):
    """A student head padded past the tokenizer can sample a padding row; the teacher (the tokenizer's rows) has none."""
    model = load_causal_lm(tiny_teacher_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    rows = model.lm_head.weight.shape[0]
    completions = [[Completion([11, rows - 1], [-1.0] * 2, "stop"), Completion([11, rows, 12], [-1.0] * 3, "stop")]]
    rollouts = build_rollouts(_groups(tokenizer)[:1], completions)
    kept = Teacher(model, micro_batch_tokens=4096).score(rollouts)
    assert kept == [rollouts[0]] and rollouts[0].teacher_lp.shape == (2,)
    assert rollouts[1].drop_reason == "past_teacher_rows" and rollouts[1].teacher_lp is None


def test_score_with_a_head_records_hidden_states(tiny_teacher_dir, tokenizer):
    model = load_causal_lm(tiny_teacher_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    rollouts = build_rollouts(_groups(tokenizer)[:1], [[Completion([11, 12, 13], [-1.0] * 3, "stop")]])
    (rollout,) = Teacher(model, micro_batch_tokens=4096, head=model.lm_head.weight.detach()).score(rollouts)
    assert rollout.teacher_hidden.shape == (3, model.config.hidden_size)


def test_close_removes_the_offload_folder(tmp_path):
    offload = tmp_path / "teacher-offload" / "rank0"
    offload.mkdir(parents=True)
    (offload / "layer.dat").write_bytes(b"\0" * 16)
    Teacher(None, micro_batch_tokens=1, offload_dir=offload).close()
    assert not (tmp_path / "teacher-offload").exists()

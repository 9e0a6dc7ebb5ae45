"""The teacher scores the kept rollouts behind the prompt its context names, is placed where its placement says
(an accelerate-offloaded one scoring and pushing exactly like the plain one), and cleans up its offload folder."""

import math

import pytest
import torch

from opd_local.config import ModelConfig
from opd_local.data import PromptGroup
from opd_local.models import load_causal_lm, load_frozen_teacher, merged_named_weights
from opd_local.rollouts import build_rollouts
from opd_local.rows import PrivilegedRow
from opd_local.samplers import Completion
from opd_local.scoring import score_completions, score_completions_distributed
from opd_local.sync import gather_engine_weights
from opd_local.teacher import Teacher, place_teacher, resolve_teacher_placement

CPU = torch.device("cpu")


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


def test_teacher_placement_resolution():
    assert resolve_teacher_placement("auto", "fsdp") == "shard"
    assert resolve_teacher_placement("auto", "ddp") == "replica"
    with pytest.raises(ValueError, match="needs a sharded student"):
        resolve_teacher_placement("shard", "ddp")
    with pytest.raises(ValueError, match="choose one of auto, replica, shard, cpu, disk"):
        resolve_teacher_placement("nvme", "none")


def test_offloaded_teacher_scores_and_pushes_like_the_plain_one(tiny_teacher_dir, tokenizer, tmp_path):
    """Layers on disk (the CPU stand-in for host memory: the same accelerate hooks, one layer loaded at a time)."""
    plain = load_frozen_teacher(tiny_teacher_dir, ModelConfig(), torch.float32, CPU)
    offloaded = place_teacher(
        load_frozen_teacher(tiny_teacher_dir, ModelConfig(), torch.float32, CPU), "disk", CPU, str(tmp_path / "offload")
    )
    assert all(p.device.type == "meta" for p in offloaded.model.layers.parameters())  # nothing resident
    assert offloaded.lm_head.weight.device == CPU  # read directly by the scoring pass, so kept in place
    prompts = [tokenizer("Tom has 3 apples.")["input_ids"], tokenizer("2+2?")["input_ids"]]
    completions = [tokenizer(" He buys 5 more: 8.")["input_ids"], tokenizer(" 4")["input_ids"]]
    want = score_completions_distributed(plain, prompts, completions, micro_batch_tokens=16).logprobs  # two micro-batches
    got = score_completions_distributed(offloaded, prompts, completions, micro_batch_tokens=16).logprobs
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
    plain_weights = dict(merged_named_weights(plain))
    pushed = dict(gather_engine_weights(offloaded))
    assert pushed.keys() == plain_weights.keys()
    for name, weight in plain_weights.items():
        assert torch.equal(pushed[name], weight), name
    assert all(p.device.type == "meta" for p in offloaded.model.layers.parameters())  # offloaded again


@pytest.mark.gpu
def test_cpu_placed_teacher_copies_from_pinned_memory(tiny_teacher_dir, tokenizer):
    """Host-memory layers are page-locked, so their per-forward copy to the GPU is a direct DMA; scores unchanged."""
    gpu = torch.device("cuda")
    plain = load_frozen_teacher(tiny_teacher_dir, ModelConfig(), torch.float32, CPU).to(gpu)
    offloaded = place_teacher(load_frozen_teacher(tiny_teacher_dir, ModelConfig(), torch.float32, CPU), "cpu", gpu, "")
    hooks = [m._hf_hook for m in offloaded.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    # Every hook reads from one accelerate loader; its state dict holds the host copies.
    host = [t for hook in hooks for t in hook.weights_map.dataset.state_dict.values()]
    assert host and all(t.is_pinned() for t in host)
    prompts, completions = [tokenizer("Tom has 3 apples.")["input_ids"]], [tokenizer(" He buys 5 more: 8.")["input_ids"]]
    (want,) = score_completions_distributed(plain, prompts, completions, micro_batch_tokens=64).logprobs
    (got,) = score_completions_distributed(offloaded, prompts, completions, micro_batch_tokens=64).logprobs
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

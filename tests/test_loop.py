"""The OPD step on a tiny random-init model with the real SmolLM2 tokenizer."""

import copy
import functools

import pytest
import torch
from safetensors.torch import load_file

from opd_local import attention
from opd_local.config import Config, LossConfig, ModelConfig
from opd_local.data import PromptGroup
from opd_local.loop import train
from opd_local.training import accumulate_gradients
from opd_local.loss import opd_micro_batch_loss
from opd_local.metrics import read_metrics, span
from opd_local.models import load_causal_lm
from opd_local.packing import pack_sequences
from opd_local.precision import PrecisionPolicy
from opd_local.rollouts import Rollout
from opd_local.rows import PrivilegedRow
from opd_local.scoring import packed_token_logprobs, score_completions
from opd_local.training import pack_micro_batch, plan_micro_batches

# The weights' own float64 throughout: what the exact gradient tests run under.
FP64 = PrecisionPolicy("cpu", torch.float64, torch.float64, torch.float64, torch.float64, "test: float64")

DESIGN_STEP_KEYS = {
    "opd/sampled_reverse_kl",
    "opd/active_tokens",
    "groups/sampled",
    "groups/filtered",
    "groups/failed",
    "sync/push_seconds",
    "sync/parity_max_abs",
    "rollout/trainer_lp_mismatch",
    "time/sample",
    "time/score",
    "time/train",
    "time/push",
}


def tiny_config(student_dir, out_dir, **rollout) -> Config:
    cfg = Config()
    cfg.model.student = student_dir
    cfg.data.max_train_rows = 16
    cfg.data.max_heldout_rows = 4
    cfg.rollout.sampler = "hf"
    cfg.rollout.groups_per_step = 2
    cfg.rollout.samples_per_group = 2
    cfg.rollout.max_tokens = 12
    for key, value in rollout.items():
        setattr(cfg.rollout, key, value)
    cfg.optim.lr = 1e-3
    cfg.optim.micro_batch_tokens = 700  # forces more than one micro-batch per step
    cfg.run.steps = 2
    cfg.run.out_dir = str(out_dir)
    cfg.eval.every = 0
    # fp32 on the CPU, forced, on any machine: these tests hold the engine to the trainer at 1e-3 and
    # exact zeros to 1e-6, which bf16 rounding would break; the bf16 policy has its own tests.
    cfg.run.device = "cpu"
    cfg.model.dtype = "float32"
    return cfg


EVAL_KEYS = {
    "eval/trace_gap",
    "eval/trace_gap_train",
    "eval/teacher_final_accuracy",
    "eval/student_greedy_accuracy",
}


def test_two_step_run_writes_metrics_and_changes_weights(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run")
    cfg.eval.every = 1
    cfg.eval.train_rows = 2
    cfg.eval.max_trace_tokens = 16
    cfg.eval.greedy_max_tokens = 16
    run_dir = train(cfg)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]  # step 2 holds only the eval after the last update
    assert all(EVAL_KEYS <= set(r) for r in records)
    assert "opd/active_tokens" not in records[2]
    assert (run_dir / "trace_cache.json").exists() and (run_dir / "trace_eval.jsonl").exists()
    assert (run_dir / "charts" / "trace_gap.png").stat().st_size > 0 and (run_dir / "summary.md").exists()
    assert list(run_dir.glob("events.out.tfevents.*"))
    for record in records[:2]:
        assert DESIGN_STEP_KEYS <= set(record)
        assert record["opd/active_tokens"] > 0
        assert record["groups/sampled"] + record["groups/filtered"] + record["groups/failed"] == 2
        assert record["sync/parity_max_abs"] < 1e-3
    before = load_file(f"{tiny_model_dir}/model.safetensors")
    after = load_file(f"{run_dir}/final/model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "lm_head.weight" in changed and len(changed) == len(before)


def _rollouts(student, tokenizer, teacher_shift: float):
    """Rollouts whose rollout_lp is the student's own logprob (theta = theta_rollout)."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    rollouts = []
    for i, (text, length) in enumerate([("2+2?", 9), ("Name a colour.", 5), ("Count to three.", 14)]):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"]
        completion = torch.randint(0, len(tokenizer), (length,), generator=g).tolist()
        (own_lp,) = score_completions(student, [prompt], [completion], micro_batch_tokens=10_000).logprobs
        teacher_lp = own_lp + teacher_shift * torch.randn(length, generator=g)
        row = PrivilegedRow(f"r{i}", ({"role": "user", "content": text},), ({"role": "user", "content": text},), None, None)
        rollouts.append(Rollout(i, PromptGroup(row, prompt, prompt), completion, own_lp, "length", teacher_lp))
    return rollouts


def test_loss_gradient_is_closed_form_at_rollout_weights(tiny_model_dir, tokenizer):
    """At theta = theta_rollout, grad(loss) = sum_t lambda*(rollout_lp_t - teacher_lp_t)/N * grad(student_lp_t).

    In float64, so that the two paths' different summation orders cannot hide a real difference.
    """
    student = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float64, torch.device("cpu"))
    rollouts = _rollouts(student, tokenizer, teacher_shift=0.7)
    loss_cfg = LossConfig(objective="sampled_rkl", kl_coef=1.5)
    batch = pack_sequences([r.group.student_prompt_ids for r in rollouts], [r.completion_ids for r in rollouts])
    with torch.no_grad():  # theta_rollout exactly: the same packed forward, in float64
        rollout_lp = packed_token_logprobs(student, batch)
    teacher_lp = rollout_lp + 0.7 * torch.randn_like(rollout_lp)
    n_active = float(batch.num_active)

    loss, student_lp = opd_micro_batch_loss(student, batch, teacher_lp, rollout_lp, loss_cfg, n_active, 1.0)
    torch.testing.assert_close(student_lp, rollout_lp, atol=1e-12, rtol=0)
    expected_loss = -loss_cfg.kl_coef * (teacher_lp - rollout_lp).sum() / n_active
    torch.testing.assert_close(loss, expected_loss, atol=1e-12, rtol=1e-10)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in student.named_parameters()}

    # Independent path: plain HF logits + log_softmax, weighted by the closed-form coefficient.
    student.zero_grad()
    logits = student(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
    lp = torch.log_softmax(logits, -1)[batch.logit_positions, batch.targets]
    coefficient = loss_cfg.kl_coef * (rollout_lp - teacher_lp) / n_active
    (coefficient * lp).sum().backward()
    for name, param in student.named_parameters():
        torch.testing.assert_close(fused[name], param.grad, atol=1e-12, rtol=1e-8, msg=name)


def test_micro_batching_does_not_change_the_gradient(tiny_model_dir, tokenizer):
    # float64, so that summation order cannot hide a real difference between the two layouts
    student = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float64, torch.device("cpu"))
    rollouts = _rollouts(student, tokenizer, teacher_shift=0.5)
    grads = []
    for budget in (100_000, 1):  # one packed micro-batch vs one sequence per micro-batch
        model = copy.deepcopy(student)
        cfg = Config()
        cfg.loss.objective = "sampled_rkl"
        cfg.optim.micro_batch_tokens = budget
        cfg.optim.lr = 0.0
        stats = accumulate_gradients(model, rollouts, cfg, FP64, budget).reduced()
        assert stats["rollout/trainer_lp_mismatch"] < 1e-4
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-12, rtol=1e-9, msg=name)


def _group_rollouts(student, tokenizer):
    """Three groups of 3 (ragged, one of a single token), 1 and 2 completions, their members interleaved
    as a step's rollouts can be; rollout_lp is the student's own unshared logprob."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"]
        for text in ("2+2?", "Name a colour.", "Count to three.")
    ]
    groups = []
    for i, text in enumerate(("2+2?", "Name a colour.", "Count to three.")):
        row = PrivilegedRow(f"r{i}", ({"role": "user", "content": text},), ({"role": "user", "content": text},), None, None)
        groups.append(PromptGroup(row, prompts[i], prompts[i]))
    rollouts = []
    for i, length in [(0, 9), (1, 5), (0, 1), (2, 7), (0, 14), (2, 3)]:
        completion = torch.randint(0, len(tokenizer), (length,), generator=g).tolist()
        (own_lp,) = score_completions(student, [prompts[i]], [completion], micro_batch_tokens=10_000).logprobs
        teacher_lp = own_lp + 0.5 * torch.randn(length, generator=g)
        rollouts.append(Rollout(i, groups[i], completion, own_lp, "length", teacher_lp))
    return rollouts


# Every attention path under token normalization; sequence normalization (which only weighs the same token
# losses otherwise) on the default path.
@pytest.mark.parametrize(
    "implementation,path,normalize",
    [
        ("sdpa", "per_sequence", "token"), ("sdpa", "per_sequence+matmul", "token"), ("sdpa", "sdpa", "token"),
        ("eager", "", "token"), ("sdpa", "per_sequence", "sequence"),
    ],
)
def test_student_shared_prefix_gives_the_unshared_loss_and_gradients(
    tiny_model_dir, tokenizer, monkeypatch, float64_norms, implementation, path, normalize
):
    """The prompt once per group, its K completions behind it: the same loss and the same gradient of
    every parameter as one prompt copy per completion (float64). Budgets: everything in one
    micro-batch; groups whole but one per micro-batch; groups cut into parts. `+matmul`: every run
    through the explicit-matmul attention the CPU uses for bf16 training."""
    path, _, matmul = path.partition("+")
    monkeypatch.setenv("OPD_PACKED_ATTENTION", path)
    if matmul:
        monkeypatch.setattr(attention, "run_attention", functools.partial(attention.run_attention, matmul=True))
    student = load_causal_lm(tiny_model_dir, ModelConfig(attn_implementation=implementation), torch.float64, torch.device("cpu"))
    rollouts = _group_rollouts(student, tokenizer)
    longest_group = 3 * 41 + 9 + 1 + 14  # P < 41 for every prompt here
    # relative: eager takes its softmax in fp32 whatever the model's dtype
    tolerance = 1e-6 if implementation == "eager" else 1e-12
    for budget in (100_000, longest_group, 45):
        results = {}
        for shared in (False, True):
            model = copy.deepcopy(student)
            cfg = Config()
            cfg.loss.objective = "sampled_rkl"
            cfg.model.student_shared_prefix = shared
            cfg.loss.normalize = normalize
            cfg.optim.micro_batch_tokens = budget
            stats = accumulate_gradients(model, rollouts, cfg, FP64, budget).reduced()
            results[shared] = stats, {n: p.grad for n, p in model.named_parameters()}
        (stats_u, grads_u), (stats_s, grads_s) = results[False], results[True]
        # the same student_lp: rollout_lp is rounded to fp32 by scoring, identically on both sides;
        # eager's fp32 softmax leaves each logprob within a few 1e-7 of float64, in either layout
        lp_tolerance = 1e-6 if implementation == "eager" else 1e-14
        assert stats_s["rollout/trainer_lp_mismatch"] == pytest.approx(stats_u["rollout/trainer_lp_mismatch"], abs=lp_tolerance)
        assert stats_s["opd/loss"] == pytest.approx(stats_u["opd/loss"], rel=tolerance, abs=1e-15)
        assert any(grad is not None and float(grad.abs().max()) > 0 for grad in grads_s.values())
        for name, grad in grads_u.items():
            error = float((grads_s[name] - grad).abs().max())
            assert error <= tolerance * float(grad.abs().max()), f"budget {budget}: {name} off by {error}"


def test_micro_batch_plan_counts_the_shared_layout(tiny_model_dir, tokenizer):
    """Groups stay whole in a micro-batch when they fit; each micro-batch's real row fits the budget, and
    a group cut into parts carries its prompt in each."""
    student = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    rollouts = _group_rollouts(student, tokenizer)
    prompt = {r.group_index: len(r.group.student_prompt_ids) for r in rollouts}
    whole = plan_micro_batches(rollouts, 100_000, shared_prefix=True)
    assert [[[r.group_index for r in seg] for seg in batch] for batch in whole] == [[[0, 0, 0], [1], [2, 2]]]
    budget = prompt[0] + 14 + 9  # group 0 (P + 24) does not fit: cut in two
    plan = plan_micro_batches(rollouts, budget, shared_prefix=True)
    for batch in plan:
        row = pack_micro_batch(batch, torch.device("cpu")).row
        assert row.input_ids.shape[1] <= budget
        assert row.input_ids.shape[1] == sum(prompt[seg[0].group_index] + sum(len(r.completion_ids) for r in seg) for seg in batch)
    segments = [[len(r.completion_ids) for r in seg] for batch in plan for seg in batch if seg[0].group_index == 0]
    assert segments == [[9, 1], [14]]
    assert sorted(id(r) for b in plan for seg in b for r in seg) == sorted(id(r) for r in rollouts)


def test_mismatched_teacher_tokenizer_is_refused(tiny_model_dir, tmp_path, tokenizer):
    from transformers import AutoTokenizer

    other = tmp_path / "other-tokenizer"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<privileged_only>"])
    tok.save_pretrained(other)
    import shutil

    for f in ("config.json", "model.safetensors"):
        shutil.copy(f"{tiny_model_dir}/{f}", other / f)
    cfg = tiny_config(tiny_model_dir, tmp_path / "run")
    cfg.model.teacher = str(other)
    with pytest.raises(ValueError, match="tokenizers differ"):
        train(cfg)


@pytest.mark.parametrize("context,objective,normalize", [("plain", "full_rkl", "token"), ("privileged", "jsd", "sequence")])
def test_full_vocabulary_objectives_train(tiny_model_dir, tmp_path, context, objective, normalize):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run")
    cfg.model.teacher_context = context
    cfg.loss.objective = objective
    cfg.loss.normalize = normalize
    run_dir = train(cfg)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1] and all(r["opd/active_tokens"] > 0 for r in records)
    if context == "plain":
        # The teacher is the student's starting weights on the same prompt: the exact divergence is 0.
        assert abs(records[0]["opd/loss"]) < 1e-6
    else:
        assert records[0]["opd/loss"] > 1e-4 and records[0]["optim/grad_norm"] > 0
    assert all(r["sync/parity_max_abs"] < 1e-3 for r in records)


def test_disk_placed_teacher_scores_like_a_resident_one_and_leaves_no_files(tiny_model_dir, tmp_path):
    records = {}
    for placement in ("replica", "disk"):
        cfg = tiny_config(tiny_model_dir, tmp_path / placement)
        cfg.model.teacher_placement = placement
        cfg.run.steps = 1
        cfg.run.save_final = False
        run_dir = train(cfg)
        (records[placement],) = read_metrics(run_dir)
        assert not (run_dir / "teacher-offload").exists()
    # Same seed, same rollouts: the teacher's placement must not change its scores.
    assert records["disk"]["opd/active_tokens"] == records["replica"]["opd/active_tokens"]
    assert records["disk"]["opd/sampled_reverse_kl"] == pytest.approx(records["replica"]["opd/sampled_reverse_kl"], abs=1e-5)


def test_teacher_shared_prefix_scores_like_packing(tiny_model_dir, tmp_path):
    records = {}
    for shared in (True, False):
        cfg = tiny_config(tiny_model_dir, tmp_path / str(shared))
        cfg.model.teacher_shared_prefix = shared
        cfg.run.steps = 1
        cfg.run.save_final = False
        (records[shared],) = read_metrics(train(cfg))
    assert records[True]["opd/active_tokens"] == records[False]["opd/active_tokens"]
    for key in ("opd/sampled_reverse_kl", "opd/loss"):
        assert records[True][key] == pytest.approx(records[False][key], abs=1e-5), key


@pytest.mark.gpu
def test_stage_time_includes_the_device_work_it_queued():
    """CUDA kernels run after the host has queued them; a stage's time must still count them."""
    device = torch.device("cuda")
    x = torch.randn(4096, 4096, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    metrics = {}
    with span(metrics, "stage", device):
        start.record()
        for _ in range(50):
            x = torch.tanh(x @ x)
        end.record()
    end.synchronize()
    assert metrics["time/stage"] >= start.elapsed_time(end) / 1000

"""The start-up packing check catches layers that leak between the sequences of a row, and the layouts it
keeps score every sequence exactly as alone."""

import types

import pytest
import torch
from model_families import one_step_config, save_tiny_family

from opd_local import models, token_mixers
from opd_local.attention import row_layout
from opd_local.config import ModelConfig
from opd_local.loop import train
from opd_local.metrics import read_metrics
from opd_local.models import load_causal_lm
from opd_local.packing import PackingPlan, packing_plan
from opd_local.packing_check import LEAK_TOLERANCE, check_packing
from opd_local.scoring import score_completions


def _running_mean_leak(mlp):
    """An MLP that also adds the running mean of its inputs along the row: a layer type opd-local does not
    know, causal, and exact on one sequence, so only packing can expose it."""
    forward = type(mlp).forward

    def leaky(self, x):
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)[None, :, None]
        return forward(self, x) + 0.5 * x.cumsum(dim=1) / steps

    mlp.forward = types.MethodType(leaky, mlp)


def _probe(tokenizer):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, len(tokenizer), (n,), generator=g).tolist() for n in (12, 12, 20, 20)]
    prompts[1], prompts[3] = prompts[0], prompts[2]  # two groups of two completions
    completions = [torch.randint(0, len(tokenizer), (n,), generator=g).tolist() for n in (5, 8, 3, 9)]
    return prompts, completions


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_a_layer_that_leaks_across_sequences_gets_one_sequence_per_row(tiny_model_dir, tokenizer, compute_dtype):
    model = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    for layer in model.model.layers:
        _running_mean_leak(layer.mlp)
    prompts, completions = _probe(tokenizer)
    leaking = score_completions(model, prompts, completions, micro_batch_tokens=10_000).logprobs
    alone = score_completions(model, prompts, completions, micro_batch_tokens=1).logprobs
    assert max(float((a - b).abs().max()) for a, b in zip(leaking, alone)) > 1e-2  # the leak is real

    check = check_packing(model, compute_dtype=compute_dtype, shared_prompt=True, vocab_size=len(tokenizer), differentiated=True)
    assert check.plan == PackingPlan(packed=False, shared_prompt=False)
    assert check.leaks["packed"] > 10 * LEAK_TOLERANCE[compute_dtype]
    assert "every sequence gets a row of its own" in check.describe("student", [])
    assert packing_plan(model) == check.plan
    # Under the plan the same call, with the same budget, scores every sequence as alone.
    checked = score_completions(model, prompts, completions, micro_batch_tokens=10_000, shared_prefix=True).logprobs
    for got, want in zip(checked, alone):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_a_shared_prompt_that_leaks_gets_a_prompt_copy_per_completion(tmp_path, tokenizer, monkeypatch):
    """Gated DeltaNet layers that start each completion of a shared prompt from nothing (no replay of the
    prompt) are wrong in that layout only: the check keeps packing and drops the shared prompt."""
    path = save_tiny_family("qwen3_5", tmp_path / "qwen3_5", tokenizer)
    model = load_causal_lm(path, ModelConfig(), torch.float32, torch.device("cpu"))
    monkeypatch.setattr(token_mixers, "row_layout", lambda ids: [(s, e, s, s) for s, e, _, _ in row_layout(ids)])
    check = check_packing(model, compute_dtype=torch.float32, shared_prompt=True, vocab_size=len(tokenizer), differentiated=True)
    assert check.plan == PackingPlan(packed=True, shared_prompt=False), check.describe("student", [])
    assert check.leaks["packed"] == 0.0 and check.errors["shared prompt"] > 1e-3
    assert "each completion gets its own copy of the prompt" in check.describe("student", ["Qwen3_5GatedDeltaNet"])
    prompts, completions = _probe(tokenizer)
    shared = score_completions(model, prompts, completions, micro_batch_tokens=10_000, shared_prefix=True).logprobs
    alone = score_completions(model, prompts, completions, micro_batch_tokens=1).logprobs
    for got, want in zip(shared, alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_run_on_unsplit_recurrent_layers_trains_on_true_logprobs(tmp_path, tokenizer, monkeypatch):
    """Qwen 3.5 with its Gated DeltaNet layers left to carry their state along the row, as transformers runs
    them: the check sees the leak on the student and the teacher, and step 0 is exact anyway."""
    monkeypatch.setattr(models, "split_token_mixers", lambda layers: None)
    cfg = one_step_config(save_tiny_family("qwen3_5", tmp_path / "qwen3_5", tokenizer), tmp_path / "run")
    [metrics] = read_metrics(train(cfg))
    assert metrics["packing/student_packed"] == metrics["packing/teacher_packed"] == 0.0
    assert metrics["time/packing_check_student"] > 0
    assert metrics["rollout/trainer_lp_mismatch"] < 1e-5, metrics
    assert abs(metrics["opd/sampled_reverse_kl"]) < 1e-5, metrics

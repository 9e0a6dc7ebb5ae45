"""LoRA: only adapter weights train, the engine gets merged weights, the teacher is the base with the adapter off."""

import copy

import torch

from opd_local.config import Config, ModelConfig
from opd_local.optimizer import build_optimizer
from opd_local.training import train_on_rollouts
from opd_local.models import apply_lora, load_causal_lm, merged_named_weights
from opd_local.precision import resolve_precision
from opd_local.samplers.hf import HFSampler
from opd_local.scoring import score_completions
from opd_local.sync import parity_probe, push_model_weights
from opd_local.teacher import Teacher
from test_loop import _rollouts

FP32 = resolve_precision("float32", torch.device("cpu"))


def _lora_student(path):
    cfg = ModelConfig(lora_rank=4, lora_alpha=8.0)
    return apply_lora(load_causal_lm(path, cfg, torch.float32, torch.device("cpu")), cfg)


def test_lora_step_trains_adapter_only_and_engine_gets_merged_weights(tiny_model_dir, tokenizer):
    base = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    student = _lora_student(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = Config()
    cfg.loss.objective = "sampled_rkl"  # the rollouts carry teacher logprobs, not hidden states
    cfg.optim.lr = 1e-2
    optimizer, scheduler = build_optimizer(student, cfg.optim)
    for _ in range(2):
        train_on_rollouts(student, optimizer, scheduler, _rollouts(student, tokenizer, teacher_shift=0.5), cfg, FP32, 1024)

    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert any(".lora_B." in n for n in changed)  # B starts at zero: a changed B means a real delta

    # The engine receives base + delta under the plain checkpoint names; PEFT's own merge agrees.
    pushed = dict(merged_named_weights(student))
    merged = copy.deepcopy(student).merge_and_unload()
    assert pushed.keys() == dict(merged.named_parameters(remove_duplicate=False)).keys()
    for name, weight in merged.named_parameters(remove_duplicate=False):
        torch.testing.assert_close(pushed[name], weight.detach(), atol=1e-6, rtol=0, msg=name)
    assert not torch.equal(pushed["model.layers.0.self_attn.q_proj.weight"], base.model.layers[0].self_attn.q_proj.weight)

    engine = HFSampler.load(tiny_model_dir, ModelConfig(), torch.device("cpu"), tokenizer.eos_token_id, tokenizer.pad_token_id)
    probe = tokenizer("Final: 42. The answer is forty-two.")["input_ids"]
    push_model_weights(engine, student)
    assert parity_probe(engine, student, probe, threshold=1e-4)["sync/parity_max_abs"] < 1e-4

    # The teacher is the same module with the adapter off: exactly the base model's scores.
    teacher = Teacher(student, micro_batch_tokens=4096, adapter_off=True)
    prompt, completion = probe[:5], probe[5:]
    with teacher.scope():
        (teacher_lp,) = score_completions(teacher.model, [prompt], [completion], micro_batch_tokens=4096).logprobs
    (base_lp,) = score_completions(base, [prompt], [completion], micro_batch_tokens=4096).logprobs
    (student_lp,) = score_completions(student, [prompt], [completion], micro_batch_tokens=4096).logprobs
    torch.testing.assert_close(teacher_lp, base_lp, atol=1e-6, rtol=0)
    assert (student_lp - base_lp).abs().max() > 1e-4  # the adapter is back on outside the scope

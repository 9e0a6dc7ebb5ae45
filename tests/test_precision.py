"""The precision policy: what `model.dtype` resolves to on each kind of device, that bad values are
refused before anything is written, and that bf16 compute keeps fp32 master weights, gradients and
AdamW state while the loss reads bf16 inputs and stays close to the fp32 loss."""

from __future__ import annotations

import pytest
import torch

import kernels
from opd_local.config import Config, LossConfig, ModelConfig
from opd_local.loop import train
from opd_local.optimizer import build_optimizer
from opd_local.loss import opd_micro_batch_loss
from opd_local.models import load_causal_lm
from opd_local.packing import pack_sequences
from opd_local.precision import PARITY_THRESHOLDS, autocast_to, canonical_dtype, multiplies_in_bf16, resolve_precision

CPU = torch.device("cpu")


@pytest.fixture
def cpu_reports(monkeypatch):
    """Make the CPU report (or not) native bf16, the way torch reports it."""

    def report(amx: bool, avx512_bf16: bool):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)

    return report


@pytest.mark.parametrize("spelling, canonical", [
    ("auto", "auto"), ("float32", "float32"), ("fp32", "float32"), ("bfloat16", "bfloat16"), ("bf16", "bfloat16"),
])
def test_dtype_spellings(spelling, canonical):
    assert canonical_dtype(spelling) == canonical


@pytest.mark.parametrize("bad", ["float16", "fp16", "half", "bf", "float", "", "auto16", "FP32", " bf16"])
def test_unknown_dtype_is_refused(bad):
    with pytest.raises(ValueError, match="model.dtype"):
        resolve_precision(bad, CPU)


@pytest.mark.parametrize("amx, avx512_bf16, expect", [
    (True, True, torch.bfloat16), (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32),
])
def test_auto_follows_what_the_cpu_reports(cpu_reports, amx, avx512_bf16, expect):
    cpu_reports(amx, avx512_bf16)
    assert multiplies_in_bf16(CPU) == (expect == torch.bfloat16)
    policy = resolve_precision("auto", CPU)
    assert policy.compute == policy.teacher == policy.loss_inputs == policy.engine == expect
    assert policy.master == torch.float32  # master weights (and with them AdamW state) never drop to bf16 under auto
    assert policy.parity_threshold(0.0) == PARITY_THRESHOLDS[expect]
    assert policy.parity_threshold(0.5) == 0.5  # a configured threshold wins


@pytest.mark.parametrize("bf16_hardware", [True, False])
def test_forced_choices_ignore_the_hardware(cpu_reports, bf16_hardware):
    cpu_reports(bf16_hardware, bf16_hardware)
    fp32 = resolve_precision("fp32", CPU)
    assert {fp32.compute, fp32.master, fp32.teacher, fp32.engine} == {torch.float32}
    bf16 = resolve_precision("bf16", CPU)
    assert {bf16.compute, bf16.teacher, bf16.engine} == {torch.bfloat16} and bf16.master == torch.float32
    assert "bf16 compute over fp32 master" in bf16.describe()
    pure = resolve_precision("auto", CPU, master="bf16")  # the memory-saving choice, bf16 compute follows
    assert {pure.compute, pure.master, pure.teacher, pure.engine} == {torch.bfloat16}
    with pytest.raises(ValueError, match="master_dtype"):
        resolve_precision("float32", CPU, master="bfloat16")
    with pytest.raises(ValueError, match="model.master_dtype='auto'"):
        resolve_precision("auto", CPU, master="auto")


def test_unknown_dtype_refused_before_the_run_directory_is_touched(tmp_path):
    cfg = Config()
    cfg.model.dtype = "float16"
    cfg.run.out_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="model.dtype.*'float16'"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def _loss_and_grads(student, batch, teacher_lp, rollout_lp, compute_dtype):
    student.zero_grad(set_to_none=True)
    with autocast_to("cpu", compute_dtype):
        loss, student_lp = opd_micro_batch_loss(
            student, batch, teacher_lp, rollout_lp, LossConfig(objective="sampled_rkl"), float(len(teacher_lp)), 1.0, compute_dtype=compute_dtype
        )
    loss.backward()
    return loss.detach(), student_lp, {n: p.grad.clone() for n, p in student.named_parameters()}


def test_bf16_compute_keeps_fp32_masters_and_stays_close_to_fp32(tiny_model_dir, tokenizer, monkeypatch):
    student = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, CPU)
    prompts = [tokenizer("Tom has 3 apples.")["input_ids"], tokenizer("What is 6 times 7?")["input_ids"]]
    completions = [tokenizer(" He buys 5 more, so 8.")["input_ids"], tokenizer(" 6 times 7 is 42.")["input_ids"]]
    batch = pack_sequences(prompts, completions)
    n = batch.targets.numel()
    teacher_lp, rollout_lp = -torch.rand(n) * 3, -torch.rand(n) * 3

    seen = []
    real = kernels.linear_opd_loss

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(kernels, "linear_opd_loss", spy)
    loss32, lp32, grads32 = _loss_and_grads(student, batch, teacher_lp, rollout_lp, torch.float32)
    loss16, lp16, grads16 = _loss_and_grads(student, batch, teacher_lp, rollout_lp, torch.bfloat16)
    assert seen == [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]  # the loss reads bf16 inputs

    assert lp16.dtype == torch.float32  # accumulated in fp32 whatever the inputs
    assert (lp16 - lp32).abs().max() < 0.1 and (lp16 - lp32).abs().mean() < 0.02
    assert abs(float(loss16 - loss32)) < 0.02 * max(1.0, abs(float(loss32)))
    for name, g32 in grads32.items():
        g16 = grads16[name]
        assert g16.dtype == torch.float32, name  # gradients land on the fp32 masters
        cosine = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
        assert cosine > 0.98, (name, float(cosine))

    optimizer, _ = build_optimizer(student, Config().optim)
    optimizer.step()
    states = [s for s in optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)

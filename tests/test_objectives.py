"""The loss objectives: every divergence's value and gradient against float64 math, full_rkl against the
exact KL, sampled_rkl converging to full_rkl in expectation, and per-sequence normalisation.

Inputs are fresh random draws each run; the seed is printed (shown on failure), OPD_TEST_SEED replays one.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import torch_ops
from opd_local.config import Config, LossConfig
from opd_local.loss import token_divisors
from opd_local.preflight import check_config
from oracles import divergence64

V = 211  # odd and prime: no chunk divides it


pytestmark = pytest.mark.usefixtures("random_seed")


def linear_inputs(n, h, dtype=torch.float32):
    hidden = torch.randn(n, h).to(dtype).requires_grad_(True)
    weight = (0.4 * torch.randn(V, h)).to(dtype).requires_grad_(True)
    teacher_hidden = torch.randn(n, h + 3).to(dtype)  # the teacher's width need not match the student's
    teacher_weight = (0.4 * torch.randn(V, h + 3)).to(dtype)
    targets = torch.randint(0, V, (n,))
    return hidden, weight, teacher_hidden, teacher_weight, targets


# (input dtype, tolerance on values, on student_lp, relative to the largest gradient entry). bf16 inputs
# are what the precision policy hands the loss on bf16 devices; the oracle sees the same rounded inputs,
# so the error left is bf16 logits and bf16 dlogits in the matmuls, against fp32 accumulation.
DTYPE_TOLERANCES = [(torch.float32, 2e-5, 1e-4, 2e-5), (torch.bfloat16, 3e-2, 6e-2, 3e-2)]


@pytest.mark.parametrize("objective", ["full_rkl", "topk_rkl", "fkl", "jsd"])
@pytest.mark.parametrize("per_token_normalizer", [False, True])
@pytest.mark.parametrize("dtype, value_tol, lp_tol, grad_tol", DTYPE_TOLERANCES, ids=["fp32", "bf16"])
def test_divergence_value_and_gradient_equal_float64(objective, per_token_normalizer, dtype, value_tol, lp_tol, grad_tol):
    n, h, chunk, temperature, scale, k, beta = 29, 24, 8, 0.8, 1.3, 17, 0.3
    hidden, weight, teacher_hidden, teacher_weight, targets = linear_inputs(n, h, dtype)
    normalizer = torch.rand(n) * 50 + 10 if per_token_normalizer else 77.0
    loss, student_lp, divergence = kernels.linear_divergence_loss(
        hidden, weight, teacher_hidden, teacher_weight, targets, objective=objective, normalizer=normalizer,
        scale=scale, k=k, beta=beta, temperature=temperature, chunk_tokens=chunk,
    )
    dhidden, dweight = torch.autograd.grad(loss, (hidden, weight))

    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    student_logits = h64 @ w64.T / temperature
    teacher_logits = teacher_hidden.double() @ teacher_weight.double().T  # the teacher at T = 1
    as_rounded = (hidden.detach() @ weight.detach().T).double() / temperature
    expect_d = divergence64(objective, student_logits, teacher_logits, k=k, beta=beta, support_logits=as_rounded)
    norm64 = normalizer.double() if per_token_normalizer else normalizer
    expect_loss = (scale * expect_d / norm64).sum()
    expect_dh, expect_dw = torch.autograd.grad(expect_loss, (h64, w64))
    expect_lp = torch.log_softmax(student_logits.detach(), -1).gather(1, targets[:, None]).squeeze(1)

    assert student_lp.dtype == divergence.dtype == torch.float32 and dhidden.dtype == dweight.dtype == dtype
    tol = dict(atol=value_tol, rtol=value_tol)
    torch.testing.assert_close(divergence.double(), expect_d.detach(), **tol)
    torch.testing.assert_close(loss.double(), expect_loss.detach(), **tol)
    torch.testing.assert_close(student_lp.double(), expect_lp, atol=lp_tol, rtol=0)
    grad_rtol = max(1e-4, grad_tol)
    torch.testing.assert_close(dhidden.double(), expect_dh, atol=grad_tol * expect_dh.abs().max().item(), rtol=grad_rtol)
    torch.testing.assert_close(dweight.double(), expect_dw, atol=grad_tol * expect_dw.abs().max().item(), rtol=grad_rtol)


def _fp32_result_products(a, b):
    """What kernels.torch_ops.common.wide_product does on CUDA, on a CPU: bf16 x bf16 products are exact in
    fp32, summed in fp32, and the result left in fp32."""
    return a.float() @ b.float() if a.dtype == torch.bfloat16 else a @ b


@pytest.mark.parametrize("objective", ["full_rkl", "fkl", "jsd"])
def test_bf16_divergences_with_fp32_logits_equal_float64_where_bf16_logits_do_not(objective, monkeypatch):
    from kernels.torch_ops import common, linear_divergence

    n, vocab, h = 64, 4096, 64
    hidden = torch.nn.functional.layer_norm(torch.randn(n, h), (h,)).bfloat16().requires_grad_(True)
    weight = (4.0 / h**0.5 * torch.randn(vocab, h)).bfloat16()  # logit std 4, as a trained head's
    teacher_hidden = (hidden.detach().float() + 0.3 * torch.randn(n, h)).bfloat16()  # a teacher near the student
    teacher_weight = (weight.float() + 1.2 / h**0.5 * torch.randn(vocab, h)).bfloat16()
    targets = torch.randint(0, vocab, (n,))

    def run():
        _, _, divergence = kernels.linear_divergence_loss(
            hidden, weight, teacher_hidden, teacher_weight, targets, objective=objective, normalizer=1.0, chunk_tokens=24
        )
        return divergence.double()

    student, teacher = hidden.detach().double() @ weight.double().T, teacher_hidden.double() @ teacher_weight.double().T
    expect = divergence64(objective, student, teacher, k=1, beta=0.5, support_logits=student)
    error_with_bf16_logits = ((run() - expect).abs().max() / expect.abs().max()).item()
    monkeypatch.setattr(common, "wide_product", _fp32_result_products)
    monkeypatch.setattr(linear_divergence, "wide_product", _fp32_result_products)
    error_with_fp32_logits = ((run() - expect).abs().max() / expect.abs().max()).item()

    assert error_with_fp32_logits < 1e-4 < 3e-3 < error_with_bf16_logits


def test_full_rkl_is_the_exact_kl_and_topk_with_k_equal_v_is_full_rkl():
    n, h = 13, 16
    hidden, weight, teacher_hidden, teacher_weight, targets = linear_inputs(n, h, torch.float64)
    common = dict(normalizer=1.0, chunk_tokens=5)
    _, _, full = kernels.linear_divergence_loss(
        hidden, weight, teacher_hidden, teacher_weight, targets, objective="full_rkl", **common
    )
    student = torch.distributions.Categorical(logits=hidden.detach() @ weight.detach().T)
    teacher = torch.distributions.Categorical(logits=teacher_hidden @ teacher_weight.T)
    torch.testing.assert_close(full, torch.distributions.kl_divergence(student, teacher), atol=1e-12, rtol=1e-10)
    _, _, topk_all = kernels.linear_divergence_loss(
        hidden, weight, teacher_hidden, teacher_weight, targets, objective="topk_rkl", k=V, **common
    )
    torch.testing.assert_close(topk_all, full, atol=1e-12, rtol=1e-10)
    _, _, fkl = kernels.linear_divergence_loss(
        hidden, weight, teacher_hidden, teacher_weight, targets, objective="fkl", **common
    )
    torch.testing.assert_close(fkl, torch.distributions.kl_divergence(teacher, student), atol=1e-12, rtol=1e-10)


def test_divergences_of_identical_distributions_are_zero_with_zero_gradient():
    n, h = 9, 16
    hidden, weight, _, _, targets = linear_inputs(n, h, torch.float64)
    for objective in torch_ops.DIVERGENCES:
        loss, _, divergence = kernels.linear_divergence_loss(
            hidden, weight, hidden.detach(), weight.detach(), targets, objective=objective, normalizer=float(n), k=5
        )
        dhidden, dweight = torch.autograd.grad(loss, (hidden, weight))
        assert divergence.abs().max() < 1e-12, objective
        assert dhidden.abs().max() < 1e-12 and dweight.abs().max() < 1e-12, objective


def test_sampled_rkl_averages_to_full_rkl_value_and_gradient():
    """E_{y ~ p_s}[sampled loss] = KL(p_s || p_t) and, at ratio 1, E[its gradient] = the gradient of KL.

    Monte Carlo over M samples per position; the tolerance is 5 standard errors of each mean, measured
    from the samples themselves (a false failure has probability below 1e-5 per compared entry).
    """
    n, v, m = 3, 12, 40_000
    student_logits = 1.5 * torch.randn(n, v, dtype=torch.float64)
    teacher_logits = 1.5 * torch.randn(n, v, dtype=torch.float64)
    z = student_logits.clone().requires_grad_(True)
    full = divergence64("full_rkl", z, teacher_logits)
    (exact_grad,) = torch.autograd.grad(full.sum(), z)

    samples = torch.multinomial(torch.softmax(student_logits, -1), m, replacement=True)  # [n, m]
    logits = student_logits.repeat_interleave(m, 0).requires_grad_(True)  # [n*m, v], one row per sample
    targets = samples.reshape(-1)
    with torch.no_grad():
        rollout_lp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
        teacher_lp = torch.log_softmax(teacher_logits, -1).repeat_interleave(m, 0).gather(1, targets[:, None]).squeeze(1)
    # One loss per sample (normaliser 1), so per-sample values and gradients give their own spread.
    _, student_lp = kernels.opd_loss(logits, targets, teacher_lp, rollout_lp, normalizer=1.0, backend="torch")
    torch.testing.assert_close(student_lp, rollout_lp, atol=1e-12, rtol=0)
    per_sample_value = (rollout_lp - teacher_lp).reshape(n, m)
    loss, _ = kernels.opd_loss(logits, targets, teacher_lp, rollout_lp, normalizer=float(m), backend="torch")
    (grad,) = torch.autograd.grad(loss, logits)
    per_sample_grad = grad.reshape(n, m, v) * m

    value_mean, value_se = per_sample_value.mean(1), per_sample_value.std(1) / math.sqrt(m)
    assert ((value_mean - full.detach()).abs() <= 5 * value_se).all(), (value_mean, full)
    grad_mean, grad_se = per_sample_grad.mean(1), per_sample_grad.std(1) / math.sqrt(m)
    assert ((grad_mean - exact_grad).abs() <= 5 * grad_se + 1e-12).all()
    # ...and the check has power: the forward-KL gradient p_s - p_t, a plausible wrong answer, fails it.
    fkl_grad = torch.softmax(student_logits, -1) - torch.softmax(teacher_logits, -1)
    assert ((grad_mean - fkl_grad).abs() > 5 * grad_se).any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampled_rkl_per_token_normalizer_equals_float64(backend):
    n, h = 23, 32
    hidden, weight, _, _, targets = linear_inputs(n, h)
    with torch.no_grad():
        base_lp = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None]).squeeze(1)
    rollout_lp = (base_lp - 0.3 * torch.rand(n, dtype=torch.float64)).float()
    teacher_lp = rollout_lp + torch.randn(n)
    lengths = [5, 11, 7]
    divisors = token_divisors(lengths, LossConfig(normalize="sequence"), float(n), 3.0)
    options = dict(backend=backend, tiles=(16, 32, 16, 1)) if backend == "triton" else dict(chunk_tokens=6)
    # Triton runs interpreted on CPU tensors, and compiled on CUDA ones when a GPU is there.
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    inputs = [t.detach().to(device) for t in (hidden, weight)]
    for t in inputs:
        t.requires_grad_(True)
    loss, _ = kernels.linear_opd_loss(
        *inputs, targets, teacher_lp.to(device), rollout_lp.to(device), normalizer=divisors.to(device),
        log_ratio_cap=0.5, **options,
    )
    dhidden, dweight = (g.cpu() for g in torch.autograd.grad(loss, inputs))

    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    student_lp = torch.log_softmax(h64 @ w64.T, -1).gather(1, targets[:, None]).squeeze(1)
    ratio = torch.exp(torch.clamp(student_lp - rollout_lp.double(), max=0.5))
    per_token = -ratio * (teacher_lp.double() - rollout_lp.double())
    # The mean over the 3 sequences of each sequence's token mean.
    expect = torch.stack([chunk.mean() for chunk in torch.split(per_token, lengths)]).mean()
    expect_dh, expect_dw = torch.autograd.grad(expect, (h64, w64))
    torch.testing.assert_close(loss.double().cpu(), expect.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dhidden.double(), expect_dh, atol=1e-5 * expect_dh.abs().max().item(), rtol=1e-3)
    torch.testing.assert_close(dweight.double(), expect_dw, atol=1e-5 * expect_dw.abs().max().item(), rtol=1e-3)


def test_bad_objective_settings_are_refused():
    for bad, message in (({"objective": "kl"}, "loss.objective"), ({"normalize": "batch"}, "loss.normalize"),
                         ({"objective": "jsd", "jsd_beta": 1.0}, "loss.jsd_beta")):
        with pytest.raises(ValueError, match=message):
            check_config(Config(loss=LossConfig(**bad)))
    hidden, weight, teacher_hidden, teacher_weight, targets = linear_inputs(4, 8)
    with pytest.raises(ValueError, match="no Triton kernel"):
        kernels.linear_divergence_loss(
            hidden, weight, teacher_hidden, teacher_weight, targets, objective="fkl", normalizer=4.0, backend="triton"
        )
    with pytest.raises(ValueError, match="teacher_hidden has 3 rows"):
        kernels.linear_divergence_loss(
            hidden, weight, teacher_hidden[:3], teacher_weight, targets, objective="fkl", normalizer=4.0
        )

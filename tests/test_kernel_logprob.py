"""token_logprobs and opd_loss on logits [N, V], each backend against the float64 math, in value and gradient.

Every test taking `backend` runs on the chunked torch path and on the Triton kernels (interpreted on CPU);
float buffers the ops allocate are NaN-poisoned, so an element an op forgets to write fails the comparison.
Chunk sizes and vocab blocks are chosen so that neither divides N or V, and both one-block and many-block
rows occur. Inputs are fresh random draws; the printed OPD_TEST_SEED replays one.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from oracles import (
    DEVICE, V, V_SMALL, backend_options, close, lp64, make_logits, opd64, opd_inputs, reinforce_value64,
    softmax_grad,
)

pytestmark = [
    pytest.mark.usefixtures("random_seed", "poisoned_allocations"),
    # The interpreter computes -inf - -inf and log(0) in masked lanes before tl.where drops them.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


# --- token_logprobs -----------------------------------------------------------------------------

LOGPROB_CASES = [
    # n, v, temperature, kind, chunk_tokens, block_v (None: the op's choice; >= V: one block a row)
    (1, V, 1.0, "normal", 1024, None),
    (1, V_SMALL, 0.7, "peaked", 1, 1024),
    (37, V, 1.0, "normal", 8, 128),  # chunk < N and does not divide it
    (37, V, 1.3, "flat", 5, 128),
    (37, V_SMALL, 0.6, "peaked", 7, 64),
    (64, V, 2.0, "normal", 64, 2048),
]
# (atol per unit of max |logits| / T, rtol) of the log-prob; (atol, rtol) of dlogits. fp32 rounding only.
FP32_LOGPROB_TOL = (2e-6, 0.0)
FP32_DLOGITS_TOL = (1e-6, 1e-4)


@pytest.mark.parametrize("n,v,temperature,kind,chunk_tokens,block_v", LOGPROB_CASES)
def test_token_logprobs_fp32_equals_float64(backend, n, v, temperature, kind, chunk_tokens, block_v):
    logits, targets = make_logits(n, v, kind)
    logits.requires_grad_(True)
    lp = kernels.token_logprobs(logits, targets, temperature, **backend_options(backend, chunk_tokens, block_v=block_v))
    assert lp.dtype == torch.float32 and lp.shape == (n,)
    grad_out = torch.randn(n, device=DEVICE)
    (dlogits,) = torch.autograd.grad(lp, logits, grad_out)

    x64 = logits.detach().double().requires_grad_(True)
    expect = lp64(x64, targets, temperature)
    (expect_grad,) = torch.autograd.grad(expect, x64, grad_out.double())
    scale = logits.detach().abs().max().item() / temperature
    close(lp, expect, atol=FP32_LOGPROB_TOL[0] * max(1.0, scale), rtol=FP32_LOGPROB_TOL[1], what="logprob")
    close(dlogits, expect_grad, *FP32_DLOGITS_TOL, what="dlogits")


@pytest.mark.parametrize("v,chunk_tokens,block_v", [(V, 5, 64), (V_SMALL, 3, 1024)])
def test_target_gradient_keeps_precision_when_p_target_near_one(backend, v, chunk_tokens, block_v):
    # d logp(y)/d x_y = 1 - p(y) ~ 1e-17 here; 1 - p(y) in fp32 would be exactly 0.
    logits, targets = make_logits(16, v, "peaked")
    logits.requires_grad_(True)
    lp = kernels.token_logprobs(logits, targets, **backend_options(backend, chunk_tokens, block_v=block_v))
    (dlogits,) = torch.autograd.grad(lp.sum(), logits)
    got = dlogits.gather(1, targets[:, None]).squeeze(1).double()
    p64 = torch.softmax(logits.detach().double(), dim=-1)
    expect = (p64 * (torch.nn.functional.one_hot(targets, v) == 0)).sum(-1)  # 1 - p(y), no fp64 cancellation
    assert (expect > 0).all() and (expect < 1e-12).all()
    close(got, expect, atol=0.0, rtol=1e-4, what="target-class gradient")


@pytest.mark.parametrize(
    # Half logits are exact in fp32, so the value matches to fp32 rounding; dlogits is written in the logits
    # dtype (8 or 11 mantissa bits), so the gradient matches to that relative precision (atol per max |g|).
    "dtype,lp_atol,grad_atol,grad_rtol", [(torch.bfloat16, 1e-5, 1e-3, 1e-2), (torch.float16, 1e-5, 1e-3, 1e-2)]
)
def test_token_logprobs_half_precision(backend, dtype, lp_atol, grad_atol, grad_rtol):
    logits, targets = make_logits(50, V, "normal", dtype)
    logits.requires_grad_(True)
    lp = kernels.token_logprobs(logits, targets, 0.8, **backend_options(backend, 16))
    grad_out = torch.randn(50, device=DEVICE)
    (dlogits,) = torch.autograd.grad(lp, logits, grad_out)
    assert lp.dtype == torch.float32 and dlogits.dtype == dtype
    x64 = logits.detach().double().requires_grad_(True)
    expect = lp64(x64, targets, 0.8)
    (expect_grad,) = torch.autograd.grad(expect, x64, grad_out.double())
    close(lp, expect, atol=lp_atol, what="half logprob")
    close(dlogits, expect_grad, atol=grad_atol * grad_out.abs().max().item(), rtol=grad_rtol, what="half dlogits")


def test_token_logprobs_strided_rows(backend):
    # Rows of a wider buffer (stride != V), e.g. a slice of the lm_head output.
    base, targets = make_logits(9, V_SMALL + 40, "normal")
    logits = base[:, 17 : 17 + V_SMALL]
    targets = targets % V_SMALL
    lp = kernels.token_logprobs(logits, targets, 1.1, **backend_options(backend, 4, block_v=128))
    close(lp, lp64(logits, targets, 1.1), atol=2e-5, what="strided logprob")


def test_token_logprobs_gradcheck():
    # fp64 runs on the torch path only (the Triton ops refuse it: test_kernel_entries.py::test_dispatch).
    logits = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (6,))
    fn = lambda x: kernels.token_logprobs(x, targets, 0.7, backend="torch", chunk_tokens=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


# --- opd_loss -----------------------------------------------------------------------------------

OPD_CASES = [
    # n, v, temperature, kind, chunk_tokens, block_v, importance_ratio, normalizer (a float, or "tensor": 0-d
    # on the device, as the trainer passes it)
    (1, V, 1.0, "normal", 1024, None, True, "tensor"),
    (45, V, 0.7, "normal", 8, 128, True, "tensor"),  # two passes over V
    (45, V_SMALL, 1.3, "peaked", 45, 512, True, "tensor"),  # one block: logits read once
    (40, V_SMALL, 1.0, "flat", 64, 64, False, "tensor"),
    (40, V, 0.9, "normal", 6, None, True, 100.0),
]


@pytest.mark.parametrize("n,v,temperature,kind,chunk_tokens,block_v,importance_ratio,normalizer", OPD_CASES)
def test_opd_loss_equals_float64_autograd(
    backend, n, v, temperature, kind, chunk_tokens, block_v, importance_ratio, normalizer
):
    kl_coef, cap = 0.7, 0.4
    if normalizer == "tensor":
        normalizer = torch.tensor(3.0 * n + 5, device=DEVICE)
    logits, targets = make_logits(n, v, kind)
    logits.requires_grad_(True)
    teacher_lp, rollout_lp = opd_inputs(logits, targets, temperature, cap, margin=0.05)
    loss, student_lp = kernels.opd_loss(
        logits, targets, teacher_lp, rollout_lp, kl_coef=kl_coef, log_ratio_cap=cap, normalizer=normalizer,
        temperature=temperature, importance_ratio=importance_ratio,
        **backend_options(backend, chunk_tokens, block_v=block_v),
    )
    assert loss.dtype == student_lp.dtype == torch.float32 and not student_lp.requires_grad
    (dlogits,) = torch.autograd.grad(loss, logits)

    norm = float(normalizer)
    s64 = lp64(logits.detach(), targets, temperature).requires_grad_(True)
    expect = opd64(s64, teacher_lp, rollout_lp, kl_coef, cap, norm, importance_ratio)
    (expect_g,) = torch.autograd.grad(expect, s64)
    if not importance_ratio:
        expect = reinforce_value64(teacher_lp, rollout_lp, kl_coef, norm)
    scale = logits.detach().abs().max().item() / temperature
    close(student_lp, s64.detach(), atol=2e-6 * max(1.0, scale), what="student_lp")
    close(loss, expect, atol=1e-5, rtol=1e-5, what="loss")
    close(dlogits, softmax_grad(logits.detach(), targets, expect_g, temperature), atol=1e-7, rtol=1e-4, what="dlogits")
    if importance_ratio:
        # Above the cap the ratio is a constant: those tokens' rows carry no gradient at all.
        above = (s64.detach() - rollout_lp.double()) > cap
        assert (dlogits[above] == 0).all()
        if n >= 3:
            assert above.any() and (~above).any()


@pytest.mark.parametrize("n,chunk_tokens,temperature", [(1, 1024, 1.0), (45, 8, 0.7), (45, 45, 1.0)])
def test_opd_gradient_at_rollout_policy_is_closed_form(n, chunk_tokens, temperature):
    # fp64, so the torch path only. At theta = theta_rollout: ratio = 1 and
    # d loss / d student_lp_t = kl_coef * (rollout_lp_t - teacher_lp_t) / N_active.
    kl_coef, normalizer = 0.7, 3.0 * n + 5
    logits, targets = make_logits(n, V, "normal", torch.float64)
    logits.requires_grad_(True)
    rollout_lp = lp64(logits.detach(), targets, temperature)
    teacher_lp = rollout_lp + torch.randn(n, dtype=torch.float64, device=DEVICE)
    opts = dict(kl_coef=kl_coef, normalizer=normalizer, temperature=temperature, backend="torch",
                chunk_tokens=chunk_tokens)
    loss, student_lp = kernels.opd_loss(logits, targets, teacher_lp, rollout_lp, log_ratio_cap=2.0, **opts)
    assert not student_lp.requires_grad
    close(student_lp, rollout_lp, atol=1e-12, what="student_lp")
    close(loss, -kl_coef * (teacher_lp - rollout_lp).sum() / normalizer, atol=1e-12, what="loss")

    (dlogits,) = torch.autograd.grad(loss, logits)
    grad_student_lp = kl_coef * (rollout_lp - teacher_lp) / normalizer
    close(dlogits, softmax_grad(logits.detach(), targets, grad_student_lp, temperature), atol=1e-12, what="dlogits")

    # Finite differences along a random direction of the logits, in float64.
    direction = torch.randn_like(logits)
    eps = 1e-6

    def value(x):
        with torch.no_grad():
            return kernels.opd_loss(x, targets, teacher_lp, rollout_lp, **opts)[0]

    fd = (value(logits + eps * direction) - value(logits - eps * direction)) / (2 * eps)
    close(fd, (dlogits * direction).sum(), atol=1e-7, rtol=1e-5, what="finite difference")


def test_opd_without_importance_ratio_fp64():
    # fp64, torch path: the REINFORCE value and gradient exactly, far from theta_rollout.
    n, kl_coef, normalizer = 30, 1.5, torch.tensor(77.0)  # normaliser as a 0-d tensor
    logits, targets = make_logits(n, V, "normal", torch.float64)
    logits.requires_grad_(True)
    rollout_lp = lp64(logits.detach(), targets) - torch.rand(n, dtype=torch.float64, device=DEVICE)
    teacher_lp = rollout_lp + torch.randn(n, dtype=torch.float64, device=DEVICE)
    loss, _ = kernels.opd_loss(
        logits, targets, teacher_lp, rollout_lp,
        kl_coef=kl_coef, normalizer=normalizer, importance_ratio=False, backend="torch", chunk_tokens=7,
    )
    advantage = kl_coef * (teacher_lp - rollout_lp)
    close(loss, -advantage.sum() / 77.0, atol=1e-12, what="REINFORCE loss value")
    (dlogits,) = torch.autograd.grad(loss, logits)
    close(dlogits, softmax_grad(logits.detach(), targets, -advantage / 77.0, 1.0), atol=1e-12, what="dlogits")


def test_opd_loss_gradcheck():
    logits = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (7,))
    rollout_lp = lp64(logits.detach(), targets) + 0.6 * torch.randn(7, dtype=torch.float64)
    teacher_lp = torch.randn(7, dtype=torch.float64) - 2
    fn = lambda x: kernels.opd_loss(  # noqa: E731
        x, targets, teacher_lp, rollout_lp, kl_coef=0.5, log_ratio_cap=0.3, normalizer=11.0, temperature=1.2,
        backend="torch", chunk_tokens=3,
    )[0]
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("chunk_tokens,block_v", [(16, 128), (64, 1024)])
def test_opd_loss_bf16_and_outer_scale(backend, chunk_tokens, block_v):
    n, normalizer = 50, 80.0
    logits, targets = make_logits(n, V, "normal", torch.bfloat16)
    logits.requires_grad_(True)
    teacher_lp, rollout_lp = opd_inputs(logits, targets, 1.0, 2.0, margin=0.05)
    loss, student_lp = kernels.opd_loss(
        logits, targets, teacher_lp, rollout_lp, normalizer=normalizer,
        **backend_options(backend, chunk_tokens, block_v=block_v),
    )
    (dlogits,) = torch.autograd.grad(3.0 * loss, logits)  # backward scales the precomputed gradient
    assert loss.dtype == student_lp.dtype == torch.float32 and dlogits.dtype == torch.bfloat16

    s64 = lp64(logits.detach(), targets).requires_grad_(True)
    expect = opd64(s64, teacher_lp, rollout_lp, 1.0, 2.0, normalizer)
    (expect_g,) = torch.autograd.grad(3.0 * expect, s64)
    expect_grad = softmax_grad(logits.detach(), targets, expect_g, 1.0)
    close(student_lp, s64.detach(), atol=1e-5, what="bf16 student_lp")
    close(loss, expect, atol=1e-5, rtol=1e-5, what="bf16 loss")
    close(dlogits, expect_grad, atol=1e-2 * expect_grad.abs().max().item(), rtol=1e-2, what="bf16 dlogits")


def test_opd_loss_no_grad_equals_float64(backend):
    logits, targets = make_logits(20, V_SMALL, "normal")
    teacher_lp, rollout_lp = opd_inputs(logits, targets, 1.0, 2.0, margin=0.05)
    with torch.no_grad():
        loss, student_lp = kernels.opd_loss(
            logits, targets, teacher_lp, rollout_lp, normalizer=20.0, **backend_options(backend, 8)
        )
    s64 = lp64(logits, targets)
    close(loss, opd64(s64, teacher_lp, rollout_lp, 1.0, 2.0, 20.0), atol=1e-6, rtol=1e-6, what="no-grad loss")
    close(student_lp, s64, atol=2e-5, what="no-grad student_lp")


def test_opd_second_backward_is_exact_or_refused(backend):
    # The gradient is precomputed; an outer scale != 1 is applied in place, so a second backward
    # through the same graph must raise rather than return a doubly scaled gradient.
    logits, targets = make_logits(4, 17, "normal")
    logits.requires_grad_(True)
    zeros = torch.zeros(4, device=DEVICE)
    loss, _ = kernels.opd_loss(logits, targets, zeros, zeros - 3, normalizer=4.0, backend=backend)
    first = torch.autograd.grad(loss, logits, retain_graph=True)[0].clone()
    close(torch.autograd.grad(loss, logits, retain_graph=True)[0], first, atol=0.0, what="second backward")
    torch.autograd.grad(3.0 * loss, logits, retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(loss, logits)

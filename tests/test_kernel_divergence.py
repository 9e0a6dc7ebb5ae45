"""full_reverse_kl and topk_reverse_kl on student and teacher logits [N, V], each backend against float64.

Float buffers the ops allocate are NaN-poisoned; vocab blocks and chunks divide neither N nor V. Inputs are
fresh random draws; the printed OPD_TEST_SEED replays one.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from oracles import DEVICE, V, V_SMALL, backend_options, close, kl64, make_logits

pytestmark = [
    pytest.mark.usefixtures("random_seed", "poisoned_allocations"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # masked interpreter lanes: -inf - -inf, log(0)
]


def kl_pair(n, v, kind, dtype=torch.float32):
    student, _ = make_logits(n, v, kind, dtype)
    teacher = (student.double() + 1.5 * torch.randn(n, v, device=DEVICE, dtype=torch.float64)).to(dtype)
    return student.requires_grad_(True), teacher


def check_kl(kl, student, teacher, temperature, k, atol_value, grad_tol, what):
    grad_out = torch.randn(student.shape[0], device=DEVICE)
    (dstudent,) = torch.autograd.grad(kl, student, grad_out)
    s64 = student.detach().double().requires_grad_(True)
    expect = kl64(s64, teacher, temperature, k)
    (expect_grad,) = torch.autograd.grad(expect, s64, grad_out.double())
    # At the argmax, float64 autograd cancels too once 1 - p_s < 1e-16 (peaked rows): there the exact
    # value is minus the sum of the row's other entries, as KL does not change when x_s shifts.
    top = s64.detach().argmax(dim=-1, keepdim=True)
    expect_grad.scatter_(1, top, 0.0)
    expect_grad.scatter_(1, top, -expect_grad.sum(dim=-1, keepdim=True))
    assert kl.dtype == torch.float32 and dstudent.dtype == student.dtype
    close(kl, expect, atol=atol_value, rtol=1e-4, what=f"{what} value")
    close(dstudent, expect_grad, atol=grad_tol * max(expect_grad.abs().max().item(), 1e-30), rtol=grad_tol,
          what=f"{what} gradient")


# (dtype, value atol, gradient tolerance: atol per max |expected| and rtol). bf16 gradients are written in bf16.
FP32_KL_TOL = (torch.float32, 1e-5, 1e-4)
BF16_KL_TOL = (torch.bfloat16, 1e-5, 1e-2)

KL_CASES = [
    # n, v, temperature, kind, chunk_tokens, block_v
    (1, V, 1.0, "normal", 5, None),
    (23, V, 0.7, "peaked", 5, 128),
    (23, V_SMALL, 1.4, "flat", 5, 64),
]


@pytest.mark.parametrize("n,v,temperature,kind,chunk_tokens,block_v", KL_CASES)
def test_full_reverse_kl_equals_float64(backend, n, v, temperature, kind, chunk_tokens, block_v):
    dtype, atol, grad_tol = FP32_KL_TOL
    student, teacher = kl_pair(n, v, kind, dtype)
    kl = kernels.full_reverse_kl(student, teacher, temperature, **backend_options(backend, chunk_tokens, block_v=block_v))
    check_kl(kl, student, teacher, temperature, None, atol, grad_tol, f"{backend} full KL")


@pytest.mark.parametrize("k", [1, 7, 300])
def test_topk_reverse_kl_equals_float64(backend, k):
    dtype, atol, grad_tol = FP32_KL_TOL
    student, teacher = kl_pair(29, V_SMALL, "normal", dtype)
    kl = kernels.topk_reverse_kl(student, teacher, k, 0.8, **backend_options(backend, 8, block_v=128))
    check_kl(kl, student, teacher, 0.8, k, atol, grad_tol, f"{backend} top-{k} KL")


def test_reverse_kl_of_identical_distributions_is_zero(backend):
    student, _ = kl_pair(8, V, "normal")
    teacher = student.detach() + 3.0  # a shift changes no probability
    for kl in (
        kernels.full_reverse_kl(student, teacher, backend=backend),
        kernels.topk_reverse_kl(student, teacher, 10, backend=backend),
    ):
        close(kl, torch.zeros(8), atol=2e-5, what="KL(p || p)")


@pytest.mark.parametrize("dtype,atol,grad_tol", [FP32_KL_TOL, BF16_KL_TOL])
def test_topk_with_k_equal_v_is_the_full_kl(backend, dtype, atol, grad_tol):
    student, teacher = kl_pair(17, V, "normal", dtype)
    options = backend_options(backend, 6, block_v=256)
    full = kernels.full_reverse_kl(student, teacher, 1.2, **options)
    topk = kernels.topk_reverse_kl(student, teacher, V, 1.2, **options)
    assert torch.equal(topk, full)  # the same sums in the same order
    g = torch.randn(17, device=DEVICE)
    (d_full,) = torch.autograd.grad(full, student, g, retain_graph=True)
    (d_topk,) = torch.autograd.grad(topk, student, g)
    assert torch.equal(d_topk, d_full)
    check_kl(full, student, teacher, 1.2, None, atol, grad_tol, "full KL")


def test_reverse_kl_bf16_equals_float64(backend):
    dtype, atol, grad_tol = BF16_KL_TOL
    student, teacher = kl_pair(21, V, "normal", dtype)
    kl = kernels.topk_reverse_kl(student, teacher, 5, 0.9, **backend_options(backend, 8))
    # bf16 ties at the k-th logit widen the support for some rows: the oracle keeps ties too.
    check_kl(kl, student, teacher, 0.9, 5, atol, grad_tol, "bf16 top-5 KL")


def test_reverse_kl_gradcheck():
    # fp64: the torch path only.
    student = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 13, dtype=torch.float64)
    full = lambda x: kernels.full_reverse_kl(x, teacher, 1.3, backend="torch", chunk_tokens=2)  # noqa: E731
    assert torch.autograd.gradcheck(full, (student,))
    # The support is fixed by the argument's top-k, which gradcheck's small perturbations leave alone.
    topk = lambda x: kernels.topk_reverse_kl(x, teacher, 4, 0.8, backend="torch", chunk_tokens=3)  # noqa: E731
    assert torch.autograd.gradcheck(topk, (student,))

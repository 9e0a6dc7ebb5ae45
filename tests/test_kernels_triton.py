"""Every Triton op equals the float64 math, in value and gradient; run on the CPU through TRITON_INTERPRET=1.

Inputs are fresh random draws each run; the seed is printed (shown on failure), OPD_TEST_SEED replays one.
Every float buffer the ops allocate is NaN-poisoned first, so an element a kernel forgets to write fails
the comparison. Shapes are small (the interpreter runs each program in numpy), V is odd so no block
divides it, and the tile overrides force both the one-block and many-block paths.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: triton.jit reads it when a function is defined, triton's
    # own tl.sum/tl.zeros included.
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import kernels  # noqa: E402
from kernels import divergence, linear_logprob, logprob, reference  # noqa: E402

if not logprob.INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU: nothing can run the Triton kernels",
                allow_module_level=True)

# When something imported triton before this file could set TRITON_INTERPRET (in the full suite, conftest
# imports transformers, which imports torch._dynamo, which imports triton), triton's own library is already
# compiled-mode and the interpreter cannot call it. This file then runs itself in a fresh process with
# TRITON_INTERPRET=1 from the start, as one test, and skips its tests here.
RERUN_IN_FRESH_PROCESS = logprob.INTERPRET and type(triton.language.zeros).__name__ != "InterpretedFunction"

DEVICE = "cpu" if logprob.INTERPRET else "cuda"
V = 1001
V_SMALL = 509
TINY_TILES = (16, 32, 16, 1)  # BLOCK_N, BLOCK_V, BLOCK_H, num_warps: many blocks on every axis

pytestmark = [
    # Masked lanes compute -inf - -inf and log(0) in numpy before tl.where drops them.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


@pytest.fixture(autouse=True)
def _seed(request):
    if RERUN_IN_FRESH_PROCESS and request.node.originalname != "test_in_a_fresh_interpreter_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1: run by test_in_a_fresh_interpreter_process")
    request.getfixturevalue("random_seed")


@pytest.fixture(autouse=True)
def _poisoned_allocations(monkeypatch):
    """torch.empty / empty_like return NaN-filled float buffers while a test runs."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    yield


# --- float64 oracles ----------------------------------------------------------------------------


def lp64(logits, targets, temperature=1.0):
    return torch.log_softmax(logits.double() / temperature, dim=-1).gather(1, targets[:, None]).squeeze(1)


def opd64(student_lp, teacher_lp, rollout_lp, kl_coef, cap, normalizer, importance_ratio=True):
    """The loss as autograd sees it; REINFORCE form: -sum(A * student_lp)/N, whose value the op reports as -sum(A)/N."""
    advantage = kl_coef * (teacher_lp.double() - rollout_lp.double())
    if importance_ratio:
        ratio = torch.exp(torch.clamp(student_lp - rollout_lp.double(), max=cap))
        return -(ratio * advantage).sum() / normalizer
    return -(advantage * student_lp).sum() / normalizer


def kl64(student_logits, teacher_logits, temperature=1.0, k=None):
    """KL(p_s || p_t) in float64; with k, on the student's top-k support (ties kept) plus one tail bucket."""
    logp_s = torch.log_softmax(student_logits.double() / temperature, dim=-1)
    logp_t = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    if k is None:
        return (p_s * (logp_s - logp_t)).sum(-1)
    raw = student_logits.detach()
    support = raw >= torch.topk(raw, k, dim=-1).values[:, -1:]
    kl = torch.where(support, p_s * (logp_s - logp_t), 0.0).sum(-1)
    tail_s = torch.where(support, 0.0, p_s).sum(-1)
    tail_t = torch.where(support, 0.0, p_t).sum(-1)
    safe_s = torch.where(tail_s > 0, tail_s, 1.0)
    safe_t = torch.where(tail_s > 0, tail_t, 1.0)
    return kl + torch.where(tail_s > 0, tail_s * (safe_s.log() - safe_t.log()), 0.0)


def make_logits(n, v, kind, dtype=torch.float32):
    targets = torch.randint(0, v, (n,))
    if kind == "peaked":  # one class ahead by ~40 nats: p(target) -> 1 in fp32
        logits = torch.randn(n, v)
        logits[torch.arange(n), targets] += 40.0
    elif kind == "flat":
        logits = 1e-3 * torch.randn(n, v)
    else:
        logits = 3.0 * torch.randn(n, v)
    return logits.to(dtype).to(DEVICE), targets.to(DEVICE)


def close(actual, expected, atol, rtol=0.0, what=""):
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def softmax_grad(logits, targets, grad_student_lp, temperature):
    """g_t * (onehot - softmax(x/T)) / T in float64."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    onehot = torch.nn.functional.one_hot(targets, logits.shape[1]).double()
    return grad_student_lp.double()[:, None] * (onehot - p) / temperature


# --- token_logprobs -----------------------------------------------------------------------------

LOGPROB_GRID = [
    # n, v, temperature, kind, block_v (None: the op's choice; >= V: one block a row)
    (1, V, 1.0, "normal", None),
    (1, V_SMALL, 0.7, "peaked", 1024),
    (37, V, 1.3, "flat", 128),
    (37, V_SMALL, 0.6, "peaked", 64),
    (64, V, 2.0, "normal", 2048),
]


@pytest.mark.parametrize("n,v,temperature,kind,block_v", LOGPROB_GRID)
def test_token_logprobs_equals_float64(n, v, temperature, kind, block_v):
    logits, targets = make_logits(n, v, kind)
    logits.requires_grad_(True)
    lp = kernels.token_logprobs(logits, targets, temperature, backend="triton", block_v=block_v)
    assert lp.dtype == torch.float32 and lp.shape == (n,)
    grad_out = torch.randn(n, device=DEVICE)
    (dlogits,) = torch.autograd.grad(lp, logits, grad_out)

    x64 = logits.detach().double().requires_grad_(True)
    expect = lp64(x64, targets, temperature)
    (expect_grad,) = torch.autograd.grad(expect, x64, grad_out.double())
    scale = logits.detach().abs().max().item() / temperature
    close(lp, expect, atol=2e-6 * max(1.0, scale), what="logprob")
    close(dlogits, expect_grad, atol=1e-6, rtol=1e-4, what="dlogits")


@pytest.mark.parametrize("block_v", [64, 1024])
def test_target_gradient_keeps_precision_when_p_target_near_one(block_v):
    # d logp(y)/d x_y = 1 - p(y) ~ 1e-17 here; 1 - p(y) in fp32 would be exactly 0.
    logits, targets = make_logits(16, V_SMALL, "peaked")
    logits.requires_grad_(True)
    lp = kernels.token_logprobs(logits, targets, backend="triton", block_v=block_v)
    (dlogits,) = torch.autograd.grad(lp.sum(), logits)
    got = dlogits.gather(1, targets[:, None]).squeeze(1).double()
    p64 = torch.softmax(logits.detach().double(), dim=-1)
    expect = (p64 * (torch.nn.functional.one_hot(targets, V_SMALL) == 0)).sum(-1)  # no fp64 cancellation either
    assert (expect > 0).all() and (expect < 1e-12).all()
    close(got, expect, atol=0.0, rtol=1e-4, what="target-class gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_logprobs_half_precision(dtype):
    # Half logits are exact in fp32: the value matches to fp32 rounding; dlogits is written in the
    # logits dtype (8 or 11 mantissa bits), so the gradient matches to that relative precision.
    logits, targets = make_logits(33, V, "normal", dtype)
    logits.requires_grad_(True)
    lp = kernels.token_logprobs(logits, targets, 0.8, backend="triton")
    grad_out = torch.randn(33, device=DEVICE)
    (dlogits,) = torch.autograd.grad(lp, logits, grad_out)
    assert lp.dtype == torch.float32 and dlogits.dtype == dtype
    x64 = logits.detach().double().requires_grad_(True)
    expect = lp64(x64, targets, 0.8)
    (expect_grad,) = torch.autograd.grad(expect, x64, grad_out.double())
    close(lp, expect, atol=1e-5, what="half logprob")
    close(dlogits, expect_grad, atol=1e-3 * grad_out.abs().max().item(), rtol=1e-2, what="half dlogits")


def test_token_logprobs_strided_rows():
    # Rows of a wider buffer (stride != V), e.g. a slice of the lm_head output.
    base, targets = make_logits(9, V_SMALL + 40, "normal")
    logits = base[:, 17 : 17 + V_SMALL]
    targets = targets % V_SMALL
    lp = kernels.token_logprobs(logits, targets, 1.1, backend="triton", block_v=128)
    close(lp, lp64(logits, targets, 1.1), atol=2e-5, what="strided logprob")


# --- opd_loss -----------------------------------------------------------------------------------


def opd_inputs(logits, targets, temperature, cap, lp_dtype=torch.float32):
    """rollout_lp placing log_ratio = student_lp - rollout_lp on both sides of the cap, >= 0.05 away from it."""
    n = logits.shape[0]
    lp = lp64(logits.detach(), targets, temperature)
    side = torch.where(torch.rand(n, device=DEVICE) < 0.3, 1.0, -1.0).double()
    log_ratio = cap + side * (0.05 + torch.rand(n, device=DEVICE, dtype=torch.float64))
    rollout_lp = (lp - log_ratio).to(lp_dtype)
    teacher_lp = rollout_lp + torch.randn(n, device=DEVICE, dtype=lp_dtype)
    return teacher_lp, rollout_lp


@pytest.mark.parametrize(
    "n,v,temperature,kind,block_v,importance_ratio",
    [
        (1, V, 1.0, "normal", None, True),
        (45, V, 0.7, "normal", 128, True),  # two passes over V
        (45, V_SMALL, 1.3, "peaked", 512, True),  # one block: logits read once
        (40, V_SMALL, 1.0, "flat", 64, False),
    ],
)
def test_opd_loss_equals_float64_autograd(n, v, temperature, kind, block_v, importance_ratio):
    kl_coef, cap = 0.7, 0.4
    normalizer = torch.tensor(3.0 * n + 5, device=DEVICE)  # a 0-d device tensor, as the trainer passes it
    logits, targets = make_logits(n, v, kind)
    logits.requires_grad_(True)
    teacher_lp, rollout_lp = opd_inputs(logits, targets, temperature, cap)
    loss, student_lp = kernels.opd_loss(
        logits, targets, teacher_lp, rollout_lp, kl_coef=kl_coef, log_ratio_cap=cap, normalizer=normalizer,
        temperature=temperature, importance_ratio=importance_ratio, backend="triton", block_v=block_v,
    )
    assert loss.dtype == student_lp.dtype == torch.float32 and not student_lp.requires_grad
    (dlogits,) = torch.autograd.grad(loss, logits)

    s64 = lp64(logits.detach(), targets, temperature).requires_grad_(True)
    expect = opd64(s64, teacher_lp, rollout_lp, kl_coef, cap, normalizer.item(), importance_ratio)
    (expect_g,) = torch.autograd.grad(expect, s64)
    if not importance_ratio:
        expect = -kl_coef * (teacher_lp.double() - rollout_lp.double()).sum() / normalizer.item()
    scale = logits.detach().abs().max().item() / temperature
    close(student_lp, s64.detach(), atol=2e-6 * max(1.0, scale), what="student_lp")
    close(loss, expect, atol=1e-5, rtol=1e-5, what="loss")
    expect_grad = softmax_grad(logits.detach(), targets, expect_g, temperature)
    close(dlogits, expect_grad, atol=1e-7, rtol=1e-4, what="dlogits")
    if importance_ratio:
        above = (s64.detach() - rollout_lp.double()) > cap
        assert (dlogits[above] == 0).all()


@pytest.mark.parametrize("block_v", [128, 1024])
def test_opd_loss_bf16_and_outer_scale(block_v):
    n, normalizer = 50, 80.0
    logits, targets = make_logits(n, V, "normal", torch.bfloat16)
    logits.requires_grad_(True)
    teacher_lp, rollout_lp = opd_inputs(logits, targets, 1.0, 2.0)
    loss, student_lp = kernels.opd_loss(
        logits, targets, teacher_lp, rollout_lp, normalizer=normalizer, backend="triton", block_v=block_v
    )
    (dlogits,) = torch.autograd.grad(3.0 * loss, logits)  # backward scales the precomputed gradient
    assert dlogits.dtype == torch.bfloat16

    s64 = lp64(logits.detach(), targets).requires_grad_(True)
    expect = opd64(s64, teacher_lp, rollout_lp, 1.0, 2.0, normalizer)
    (expect_g,) = torch.autograd.grad(3.0 * expect, s64)
    expect_grad = softmax_grad(logits.detach(), targets, expect_g, 1.0)
    close(student_lp, s64.detach(), atol=1e-5, what="bf16 student_lp")
    close(loss, expect, atol=1e-5, rtol=1e-5, what="bf16 loss")
    close(dlogits, expect_grad, atol=1e-2 * expect_grad.abs().max().item(), rtol=1e-2, what="bf16 dlogits")


def test_opd_loss_no_grad_matches_and_skips_gradient():
    logits, targets = make_logits(20, V_SMALL, "normal")
    teacher_lp, rollout_lp = opd_inputs(logits, targets, 1.0, 2.0)
    with torch.no_grad():
        loss, student_lp = kernels.opd_loss(logits, targets, teacher_lp, rollout_lp, normalizer=20.0, backend="triton")
    ref_loss, ref_lp = reference.opd_loss(logits, targets, teacher_lp, rollout_lp, normalizer=20.0)
    close(loss, ref_loss, atol=1e-6, rtol=1e-6, what="no-grad loss")
    close(student_lp, ref_lp, atol=2e-5, what="no-grad student_lp")


# --- linear_token_logprobs / linear_opd_loss ---------------------------------------------------


def linear_inputs(n, h, v, dtype, weight_scale=0.3):
    hidden = torch.randn(n, h, device=DEVICE).to(dtype).requires_grad_(True)
    weight = (weight_scale * torch.randn(v, h, device=DEVICE)).to(dtype).requires_grad_(True)
    return hidden, weight, torch.randint(0, v, (n,), device=DEVICE)


def float64_leaves(*tensors):
    return [t.detach().double().requires_grad_(True) for t in tensors]


# fp32: fp32 products and sums. bf16: inputs are exact, logits fp32-accumulated, dlogits rounded to bf16
# before the gradient matmuls (like autograd's bf16 matmul) and dH/dW rounded to bf16 at the end.
LINEAR_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize(
    "n,h,v,temperature,dtype",
    [
        (1, 40, V_SMALL, 1.0, torch.float32),
        (37, 40, V_SMALL, 0.7, torch.float32),
        (37, 64, V, 1.5, torch.bfloat16),
    ],
)
def test_linear_token_logprobs_equals_float64_autograd(n, h, v, temperature, dtype):
    hidden, weight, targets = linear_inputs(n, h, v, dtype)
    lp = kernels.linear_token_logprobs(hidden, weight, targets, temperature, backend="triton", tiles=TINY_TILES)
    grad_out = torch.randn(n, device=DEVICE)
    dhidden, dweight = torch.autograd.grad(lp, (hidden, weight), grad_out)
    assert lp.dtype == torch.float32 and dhidden.dtype == dweight.dtype == dtype

    h64, w64 = float64_leaves(hidden, weight)
    expect = lp64(h64 @ w64.T, targets, temperature)
    expect_dh, expect_dw = torch.autograd.grad(expect, (h64, w64), grad_out.double())
    tol = LINEAR_TOL[dtype]
    close(lp, expect, atol=2e-5 if dtype == torch.float32 else 1e-4, what="logprob")
    close(dhidden, expect_dh, atol=tol * expect_dh.abs().max().item(), rtol=tol, what="dhidden")
    close(dweight, expect_dw, atol=tol * expect_dw.abs().max().item(), rtol=tol, what="dweight")


@pytest.mark.parametrize("dtype,importance_ratio", [(torch.float32, True), (torch.bfloat16, False)])
def test_linear_opd_loss_equals_float64_autograd(dtype, importance_ratio, monkeypatch):
    monkeypatch.setattr(linear_logprob, "DH_CHUNK_ROWS", 16)  # several dH launches, the last one partial
    n, h = 37, 48
    kw = dict(kl_coef=0.8, log_ratio_cap=0.4, normalizer=120.0, temperature=0.9, importance_ratio=importance_ratio)
    hidden, weight, targets = linear_inputs(n, h, V_SMALL, dtype)
    h64, w64 = float64_leaves(hidden, weight)
    teacher_lp, rollout_lp = opd_inputs(h64.detach() @ w64.detach().T, targets, kw["temperature"], kw["log_ratio_cap"])

    loss, student_lp = kernels.linear_opd_loss(
        hidden, weight, targets, teacher_lp, rollout_lp, backend="triton", tiles=TINY_TILES, **kw
    )
    dhidden, dweight = torch.autograd.grad(loss, (hidden, weight))
    assert dhidden.dtype == dweight.dtype == dtype and not student_lp.requires_grad

    s64 = lp64(h64 @ w64.T, targets, kw["temperature"])
    expect = opd64(s64, teacher_lp, rollout_lp, kw["kl_coef"], kw["log_ratio_cap"], kw["normalizer"], importance_ratio)
    expect_dh, expect_dw = torch.autograd.grad(expect, (h64, w64))
    if not importance_ratio:
        expect = -kw["kl_coef"] * (teacher_lp.double() - rollout_lp.double()).sum() / kw["normalizer"]
    tol = LINEAR_TOL[dtype]
    close(student_lp, s64.detach(), atol=1e-4, what="student_lp")
    close(loss, expect, atol=1e-5, rtol=1e-5, what="loss")
    close(dhidden, expect_dh, atol=tol * expect_dh.abs().max().item(), rtol=tol, what="dhidden")
    close(dweight, expect_dw, atol=tol * expect_dw.abs().max().item(), rtol=tol, what="dweight")


def test_linear_opd_loss_frozen_weight_outer_scale_and_no_grad():
    n, h = 20, 32
    hidden, weight, targets = linear_inputs(n, h, V_SMALL, torch.float32)
    weight = weight.detach()  # frozen: no dW is computed or returned
    rollout_lp = torch.randn(n, device=DEVICE) - 5
    teacher_lp = rollout_lp + torch.randn(n, device=DEVICE)
    args = (hidden, weight, targets, teacher_lp, rollout_lp)
    loss, student_lp = kernels.linear_opd_loss(*args, normalizer=n, backend="triton", tiles=TINY_TILES)
    (2.5 * loss).backward()
    assert hidden.grad is not None and weight.grad is None
    ref_loss, _ = reference.linear_opd_loss(*args, normalizer=n)
    (ref_dh,) = torch.autograd.grad(2.5 * ref_loss, hidden)
    close(hidden.grad, ref_dh, atol=1e-6, rtol=1e-4, what="scaled dhidden")
    with torch.no_grad():
        loss2, student_lp2 = kernels.linear_opd_loss(*args, normalizer=n, backend="triton", tiles=TINY_TILES)
    assert not loss2.requires_grad
    close(loss2, loss.detach(), atol=0.0, what="no_grad loss")
    close(student_lp2, student_lp, atol=0.0, what="no_grad student_lp")


@pytest.mark.parametrize("tiles", sorted(set(linear_logprob.FWD_TILE_CANDIDATES + linear_logprob.GRAD_TILE_CANDIDATES)))
def test_every_autotuning_candidate_equals_float64(tiles):
    # The autotuner may pick any candidate on a GPU: each must compute the same function, tails included.
    n, h = 150, 80  # neither divides by any candidate's BLOCK_N or BLOCK_H
    hidden, weight, targets = linear_inputs(n, h, V_SMALL, torch.float32)
    lp = kernels.linear_token_logprobs(hidden, weight, targets, 0.8, backend="triton", tiles=tiles)
    grad_out = torch.randn(n, device=DEVICE)
    dhidden, dweight = torch.autograd.grad(lp, (hidden, weight), grad_out)
    h64, w64 = float64_leaves(hidden, weight)
    expect = lp64(h64 @ w64.T, targets, 0.8)
    expect_dh, expect_dw = torch.autograd.grad(expect, (h64, w64), grad_out.double())
    close(lp, expect, atol=2e-5, what=f"logprob {tiles}")
    close(dhidden, expect_dh, atol=2e-5 * expect_dh.abs().max().item(), rtol=2e-5, what=f"dhidden {tiles}")
    close(dweight, expect_dw, atol=2e-5 * expect_dw.abs().max().item(), rtol=2e-5, what=f"dweight {tiles}")


def test_linear_gradients_are_deterministic():
    hidden, weight, targets = linear_inputs(33, 32, 200, torch.bfloat16)
    runs = []
    for _ in range(2):
        lp = kernels.linear_token_logprobs(hidden, weight, targets, backend="triton", tiles=TINY_TILES)
        runs.append(torch.autograd.grad(lp.sum(), (hidden, weight)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_small_n_runs_the_chunked_path_with_the_same_arguments(monkeypatch):
    """Row-block grids need one block per SM; smaller N (shared-prefix teacher scoring: ~256 rows) runs the
    chunked cuBLAS path, which must get every argument of the call."""
    assert not linear_logprob.fills_gpu(256, 132) and linear_logprob.fills_gpu(132 * 64, 132)
    calls = []
    for name in ("linear_token_logprobs", "linear_opd_loss"):
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    monkeypatch.setattr(linear_logprob, "_use_chunked_path", lambda hidden, tiles: tiles is None)
    n, h = 21, 24
    kw = dict(kl_coef=0.8, log_ratio_cap=0.4, normalizer=50.0, temperature=0.9, importance_ratio=True)
    hidden, weight, targets = linear_inputs(n, h, V_SMALL, torch.float32)
    h64, w64 = float64_leaves(hidden, weight)
    teacher_lp, rollout_lp = opd_inputs(h64.detach() @ w64.detach().T, targets, kw["temperature"], kw["log_ratio_cap"])
    lp = kernels.linear_token_logprobs(hidden, weight, targets, kw["temperature"], backend="triton")
    loss, student_lp = kernels.linear_opd_loss(hidden, weight, targets, teacher_lp, rollout_lp, backend="triton", **kw)
    assert calls == ["linear_token_logprobs", "linear_opd_loss"]
    s64 = lp64(h64 @ w64.T, targets, kw["temperature"])
    expect = opd64(s64, teacher_lp, rollout_lp, kw["kl_coef"], kw["log_ratio_cap"], kw["normalizer"])
    close(lp, s64.detach(), atol=2e-5, what="chunked logprob")
    close(student_lp, s64.detach(), atol=2e-5, what="chunked student_lp")
    close(loss, expect, atol=1e-5, rtol=1e-5, what="chunked loss")


# --- full and top-k reverse KL ------------------------------------------------------------------


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


KL_GRID = [
    # n, v, temperature, kind, block_v
    (1, V, 1.0, "normal", None),
    (23, V, 0.7, "peaked", 128),
    (23, V_SMALL, 1.4, "flat", 64),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("n,v,temperature,kind,block_v", KL_GRID)
def test_full_reverse_kl_equals_float64(backend, n, v, temperature, kind, block_v):
    student, teacher = kl_pair(n, v, kind)
    extra = {"block_v": block_v} if backend == "triton" else {"chunk_tokens": 5}
    kl = kernels.full_reverse_kl(student, teacher, temperature, backend=backend, **extra)
    check_kl(kl, student, teacher, temperature, None, 1e-5, 1e-4, f"{backend} full KL")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("k", [1, 7, 300])
def test_topk_reverse_kl_equals_float64(backend, k):
    student, teacher = kl_pair(29, V_SMALL, "normal")
    extra = {"block_v": 128} if backend == "triton" else {"chunk_tokens": 8}
    kl = kernels.topk_reverse_kl(student, teacher, k, 0.8, backend=backend, **extra)
    check_kl(kl, student, teacher, 0.8, k, 1e-5, 1e-4, f"{backend} top-{k} KL")


def test_reverse_kl_of_identical_distributions_is_zero():
    student, _ = kl_pair(8, V, "normal")
    teacher = student.detach() + 3.0  # a shift changes no probability
    for kl in (
        kernels.full_reverse_kl(student, teacher, backend="triton"),
        kernels.topk_reverse_kl(student, teacher, 10, backend="triton"),
    ):
        close(kl, torch.zeros(8), atol=2e-5, what="KL(p || p)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_with_k_equal_v_is_the_full_kl(dtype):
    student, teacher = kl_pair(17, V, "normal", dtype)
    full = kernels.full_reverse_kl(student, teacher, 1.2, backend="triton", block_v=256)
    topk = kernels.topk_reverse_kl(student, teacher, V, 1.2, backend="triton", block_v=256)
    assert torch.equal(topk, full)  # the same sums in the same order
    g = torch.randn(17, device=DEVICE)
    (d_full,) = torch.autograd.grad(full, student, g, retain_graph=True)
    (d_topk,) = torch.autograd.grad(topk, student, g)
    assert torch.equal(d_topk, d_full)
    check_kl(full, student, teacher, 1.2, None, 1e-5, 1e-2 if dtype == torch.bfloat16 else 1e-4, "full KL")
    close(reference.topk_reverse_kl(student, teacher, V, 1.2), full, atol=1e-5, what="reference top-V KL")


def test_reverse_kl_bf16_equals_float64():
    student, teacher = kl_pair(21, V, "normal", torch.bfloat16)
    kl = kernels.topk_reverse_kl(student, teacher, 5, 0.9, backend="triton")
    # bf16 ties at the k-th logit widen the support for some rows: the oracle keeps ties too.
    check_kl(kl, student, teacher, 0.9, 5, 1e-5, 1e-2, "bf16 top-5 KL")


def test_reverse_kl_reference_gradcheck():
    student = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 13, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: reference.full_reverse_kl(x, teacher, 1.3, chunk_tokens=2), (student,))
    # The support is fixed by the argument's top-k, which gradcheck's small perturbations leave alone.
    assert torch.autograd.gradcheck(lambda x: reference.topk_reverse_kl(x, teacher, 4, 0.8, chunk_tokens=3), (student,))


# --- every output element is written; dispatch ------------------------------------------------


def test_every_output_element_is_written():
    # The autouse fixture fills each torch.empty(_like) with NaN; one forgotten row, column or tail shows here.
    assert torch.isnan(torch.empty(3)).all()
    n, v, h = 19, 77, 24  # no block size divides any of them
    logits, targets = make_logits(n, v, "normal", torch.bfloat16)
    logits.requires_grad_(True)
    teacher = make_logits(n, v, "normal", torch.bfloat16)[0]
    lp_small = lp64(logits.detach(), targets).float()
    outputs = [
        kernels.token_logprobs(logits, targets, backend="triton", block_v=32),
        *kernels.opd_loss(logits, targets, lp_small, lp_small - 0.1, normalizer=n, backend="triton", block_v=32),
        kernels.full_reverse_kl(logits, teacher, backend="triton", block_v=32),
        kernels.topk_reverse_kl(logits, teacher, 3, backend="triton", block_v=32),
    ]
    hidden, weight, lin_targets = linear_inputs(n, h, v, torch.bfloat16)
    outputs += [
        kernels.linear_token_logprobs(hidden, weight, lin_targets, backend="triton", tiles=TINY_TILES),
        *kernels.linear_opd_loss(
            hidden, weight, lin_targets, lp_small, lp_small, normalizer=n, backend="triton", tiles=TINY_TILES
        ),
    ]
    for i, out in enumerate(outputs):
        assert torch.isfinite(out).all(), f"output {i} has unwritten (NaN) elements"
    differentiable = [o for o in outputs if o.requires_grad]
    grads = torch.autograd.grad([o.sum() for o in differentiable], (logits, hidden, weight))
    for name, grad in zip(("dlogits", "dhidden", "dweight"), grads):
        assert torch.isfinite(grad).all(), f"{name} has unwritten (NaN) elements"


def test_dispatch():
    logits, targets = make_logits(4, 11, "normal")
    assert kernels._impl("token_logprobs", logits, "reference") is reference.token_logprobs
    assert kernels._impl("token_logprobs", logits, "triton") is logprob.token_logprobs
    assert kernels._impl("topk_reverse_kl", logits, "triton") is divergence.topk_reverse_kl
    expect_auto = logprob.token_logprobs if logits.is_cuda else reference.token_logprobs
    assert kernels._impl("token_logprobs", logits, "auto") is expect_auto
    assert kernels._impl("token_logprobs", logits.double(), "auto") is reference.token_logprobs
    with pytest.raises(ValueError, match="backend"):
        kernels.token_logprobs(logits, targets, backend="cuda")
    with pytest.raises(ValueError, match="fp64"):
        kernels.token_logprobs(logits.double(), targets, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("bad", [-1, V_SMALL])
def test_out_of_range_targets_are_refused_on_the_host(backend, bad):
    # Checked before any launch, with a host-side ValueError: on CUDA a device-side assert loses its
    # message and kills the context, so the check must not be left to the device.
    logits, targets = make_logits(6, V_SMALL, "normal")
    hidden, weight, _ = linear_inputs(6, 16, V_SMALL, torch.float32)
    targets = targets.cpu()
    targets[3] = bad
    extra = {"tiles": TINY_TILES} if backend == "triton" else {}
    calls = [
        lambda: kernels.token_logprobs(logits, targets, backend=backend),
        lambda: kernels.opd_loss(logits, targets, targets.float(), targets.float(), normalizer=6.0, backend=backend),
        lambda: kernels.linear_token_logprobs(hidden, weight, targets, backend=backend, **extra),
        lambda: kernels.linear_opd_loss(
            hidden, weight, targets, targets.float(), targets.float(), normalizer=6.0, backend=backend, **extra
        ),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=rf"targets must lie in \[0, V={V_SMALL}\).*\[{bad}\]"):
            call()


def test_kernels_give_nan_rather_than_a_value_for_an_unchecked_bad_target():
    # Targets already on the device are not checked on the host (that would sync): the kernels themselves
    # must then mark the row, not return -lse as if the target were a column with zero probability.
    logits, targets = make_logits(5, V_SMALL, "normal")
    targets[2] = V_SMALL + 4
    hidden, weight, _ = linear_inputs(5, 16, V_SMALL, torch.float32)
    with torch.no_grad():
        lp = logprob._TokenLogprobs.apply(logits, targets, 1.0, None)
        opd_lp = logprob._OPDLoss.apply(
            logits, targets, lp.nan_to_num(), lp.nan_to_num(), (1.0, 2.0, 5.0, 1.0, True, None), False
        )[1]
        lin_lp = linear_logprob._LinearTokenLogprobs.apply(hidden, weight, targets, 1.0, TINY_TILES)
    good = torch.arange(5, device=DEVICE) != 2
    for out in (lp, opd_lp, lin_lp):
        assert torch.isnan(out[2]) and torch.isfinite(out[good]).all()


# --- the kernels compile for a Hopper GPU (sm_90), without one ---------------------------------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, sys.argv[1])
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.backends.nvidia.compiler import get_ptxas_version
        get_ptxas_version(90)  # the wheel's ptxas runs on this machine
        target = GPUTarget("cuda", 90, 32)
    except Exception as exc:  # an API this check cannot use: not a kernel error
        print("SKIP", exc)
        sys.exit(0)
    from kernels import divergence as D, linear_logprob as LL, logprob as L

    def build(fn, consts, warps, dtype):
        types = {"V": "i32", "N": "i32", "H": "i32", "inv_temp": "fp32", "kl_coef": "fp32", "log_ratio_cap": "fp32"}
        half = {"logits_ptr", "dlogits_ptr", "h_ptr", "w_ptr", "s_ptr", "t_ptr", "ds_ptr", "thr_ptr"}
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in types:
                sig[name] = types[name]
            elif "stride" in name:
                sig[name] = "i64"
            elif name == "targets_ptr":
                sig[name] = "*i64"
            elif name == "argmax_ptr":
                sig[name] = "*i32"
            else:
                sig[name] = "*" + dtype if name in half else "*fp32"
        triton.compile(ASTSource(fn, sig, constexprs=consts), target=target, options=dict(num_warps=warps))

    for dtype in ("bf16", "fp32"):
        build(L._logprob_fwd_kernel, dict(BLOCK_V=4096), 8, dtype)
        build(L._logprob_bwd_kernel, dict(BLOCK_V=4096), 8, dtype)
        for single, block, warps in ((False, 4096, 8), (True, 16384, 16)):
            build(L._opd_fwd_kernel, dict(IMPORTANCE_RATIO=True, NEED_GRAD=True, SINGLE_BLOCK=single, BLOCK_V=block),
                  warps, dtype)
        bn, bv, bh, warps = LL.GPU_TILES
        tiles = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, UPCAST=False, PRECISION="ieee" if dtype == "fp32" else "tf32")
        build(LL._linear_fwd_kernel, dict(OPD=True, IMPORTANCE_RATIO=True, **tiles), warps, dtype)
        build(LL._linear_dh_kernel, tiles, warps, dtype)
        build(LL._linear_dw_kernel, tiles, warps, dtype)
        for topk in (False, True):
            build(D._rkl_fwd_kernel, dict(TOPK=topk, BLOCK_V=4096), 8, dtype)
            build(D._rkl_bwd_kernel, dict(TOPK=topk, BLOCK_V=4096), 8, dtype)
    print("OK")
    """
)


def test_kernels_compile_for_sm90():
    # The interpreter runs the kernels as numpy; this runs the real compiler (to PTX and cubin, with the
    # wheel's ptxas) on the GPU configurations, so a construct only the GPU path rejects fails here.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, root], capture_output=True, text=True, env=env, timeout=600
    )
    if proc.stdout.startswith("SKIP"):
        pytest.skip(f"cannot drive the Triton compiler without a GPU here: {proc.stdout.strip()}")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.skipif(not RERUN_IN_FRESH_PROCESS, reason="the tests above ran in this process")
def test_in_a_fresh_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, env=env, timeout=1200,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-4000:]

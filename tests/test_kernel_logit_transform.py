"""The ops' logit transform, softcap(logit_scale * z) / T with softcap(u) = cap * tanh(u / cap), each backend
against float64 autograd through the same expression: a scale alone (Cohere, Granite), a cap alone (Gemma 2),
both, at T != 1, in value and gradient. The teacher side of the two-model ops has its own transform.

Logits are wide (std 8) so that the cap bends most of them and saturates some. Float buffers the ops allocate
are NaN-poisoned; inputs are fresh random draws, and the printed OPD_TEST_SEED replays one.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import kernels
from oracles import (
    DEVICE, LINEAR_TOL, TINY_TILES, backend_options, close, divergence64, float64_leaves, linear_inputs, logits64, opd64,
    opd_inputs,
)

pytestmark = [
    pytest.mark.usefixtures("random_seed", "poisoned_allocations"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # masked interpreter lanes: -inf - -inf, log(0)
]

TEMPERATURE = 0.7
# (logit_scale, softcap): Granite's 1 / logits_scaling, a Gemma-2-like cap (small, for logits of std 8), both.
TRANSFORMS = [(0.125, None), (1.0, 5.0), (2.5, 6.0)]
TRANSFORM_IDS = ["scale", "softcap", "scale+softcap"]
# The teacher's own transform in the two-model ops: another architecture than the student's.
TEACHER = dict(teacher_logit_scale=0.5, teacher_softcap=4.0)


def transform_kw(transform) -> dict:
    scale, cap = transform
    return dict(logit_scale=scale, softcap=cap)


def wide_logits(n, v, dtype=torch.float32):
    logits = 8.0 * torch.randn(n, v, device=DEVICE)
    targets = torch.randint(0, v, (n,), device=DEVICE)
    return logits.to(dtype).requires_grad_(True), targets


def lp64(x64, targets):
    return torch.log_softmax(x64, dim=-1).gather(1, targets[:, None]).squeeze(1)


def grad_close(actual, expected, tol, what):
    close(actual, expected, atol=tol * expected.abs().max().item(), rtol=tol, what=what)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_token_logprobs(backend, transform):
    n, v = 19, 509
    logits, targets = wide_logits(n, v)
    lp = kernels.token_logprobs(
        logits, targets, TEMPERATURE, **transform_kw(transform), **backend_options(backend, 7, block_v=128)
    )
    grad_out = torch.randn(n, device=DEVICE)
    (dlogits,) = torch.autograd.grad(lp, logits, grad_out)

    (z64,) = float64_leaves(logits)
    x64 = logits64(z64, *transform, TEMPERATURE)
    expect = lp64(x64, targets)
    (expect_grad,) = torch.autograd.grad(expect, z64, grad_out.double())
    close(lp, expect, atol=2e-6 * x64.detach().abs().max().item(), what="logprob")
    grad_close(dlogits, expect_grad, 1e-5, "dlogits")


@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_opd_loss(backend, transform):
    n, v = 23, 101  # V pads to one 128-wide block: the Triton kernel's single-block path
    kw = dict(kl_coef=0.8, log_ratio_cap=0.4, normalizer=50.0, temperature=TEMPERATURE)
    logits, targets = wide_logits(n, v)
    (z64,) = float64_leaves(logits)
    x64 = logits64(z64, *transform, TEMPERATURE)
    teacher_lp, rollout_lp = opd_inputs(x64.detach(), targets, 1.0, kw["log_ratio_cap"], margin=0.05)
    loss, student_lp = kernels.opd_loss(
        logits, targets, teacher_lp, rollout_lp, **kw, **transform_kw(transform), **backend_options(backend, 6)
    )
    (dlogits,) = torch.autograd.grad(loss, logits)

    s64 = lp64(x64, targets)
    expect = opd64(s64, teacher_lp, rollout_lp, kw["kl_coef"], kw["log_ratio_cap"], kw["normalizer"])
    (expect_grad,) = torch.autograd.grad(expect, z64)
    close(student_lp, s64.detach(), atol=2e-6 * x64.detach().abs().max().item(), what="student_lp")
    close(loss, expect, atol=1e-5, rtol=1e-5, what="loss")
    grad_close(dlogits, expect_grad, 1e-5, "dlogits")


@pytest.mark.parametrize(
    "transform,dtype",
    [*((t, torch.float32) for t in TRANSFORMS), (TRANSFORMS[2], torch.bfloat16)],
    ids=[*(f"{i}-fp32" for i in TRANSFORM_IDS), f"{TRANSFORM_IDS[2]}-bf16"],
)
def test_linear_token_logprobs(backend, transform, dtype):
    n, h, v = 21, 24, 203  # 2 row tiles, 7 vocab tiles, 2 H tiles; chunks of 8 rows
    hidden, weight, targets = linear_inputs(n, h, v, dtype, weight_scale=1.5)  # logits of std ~7
    lp = kernels.linear_token_logprobs(
        hidden, weight, targets, TEMPERATURE, **transform_kw(transform), **backend_options(backend, 8, tiles=TINY_TILES)
    )
    grad_out = torch.randn(n, device=DEVICE)
    dhidden, dweight = torch.autograd.grad(lp, (hidden, weight), grad_out)
    assert lp.dtype == torch.float32 and dhidden.dtype == dweight.dtype == dtype

    h64, w64 = float64_leaves(hidden, weight)
    expect = lp64(logits64(h64 @ w64.T, *transform, TEMPERATURE), targets)
    expect_dh, expect_dw = torch.autograd.grad(expect, (h64, w64), grad_out.double())
    lp_atol, tol = LINEAR_TOL[backend, dtype]
    close(lp, expect, atol=lp_atol, what="logprob")
    grad_close(dhidden, expect_dh, tol, "dhidden")
    grad_close(dweight, expect_dw, tol, "dweight")


@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_linear_opd_loss(backend, transform):
    n, h, v = 21, 24, 203
    kw = dict(kl_coef=0.8, log_ratio_cap=0.4, normalizer=60.0, temperature=TEMPERATURE)
    hidden, weight, targets = linear_inputs(n, h, v, torch.float32, weight_scale=1.5)
    h64, w64 = float64_leaves(hidden, weight)
    x64 = logits64(h64 @ w64.T, *transform, TEMPERATURE)
    teacher_lp, rollout_lp = opd_inputs(x64.detach(), targets, 1.0, kw["log_ratio_cap"], margin=0.05)
    loss, student_lp = kernels.linear_opd_loss(
        hidden, weight, targets, teacher_lp, rollout_lp, **kw, **transform_kw(transform),
        **backend_options(backend, 8, tiles=TINY_TILES),
    )
    dhidden, dweight = torch.autograd.grad(loss, (hidden, weight))

    s64 = lp64(x64, targets)
    expect = opd64(s64, teacher_lp, rollout_lp, kw["kl_coef"], kw["log_ratio_cap"], kw["normalizer"])
    expect_dh, expect_dw = torch.autograd.grad(expect, (h64, w64))
    close(student_lp, s64.detach(), atol=2e-5, what="student_lp")
    close(loss, expect, atol=1e-5, rtol=1e-5, what="loss")
    grad_close(dhidden, expect_dh, 2e-5, "dhidden")
    grad_close(dweight, expect_dw, 2e-5, "dweight")


@pytest.mark.parametrize("objective", kernels.torch_ops.DIVERGENCES)
@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_linear_divergence_loss(transform, objective):
    # No Triton kernel: the chunked torch path on every device.
    n, h, v, k = 21, 24, 203, 9
    hidden, weight, targets = linear_inputs(n, h, v, torch.float32, weight_scale=1.5)
    teacher_hidden = torch.randn(n, h + 8, device=DEVICE)
    teacher_weight = 1.5 * torch.randn(v, h + 8, device=DEVICE)
    loss, student_lp, divergence = kernels.linear_divergence_loss(
        hidden, weight, teacher_hidden, teacher_weight, targets, objective=objective, normalizer=40.0, scale=0.7,
        k=k, temperature=TEMPERATURE, chunk_tokens=8, **transform_kw(transform), **TEACHER,
    )
    dhidden, dweight = torch.autograd.grad(loss, (hidden, weight))

    h64, w64 = float64_leaves(hidden, weight)
    z64 = h64 @ w64.T
    xs = logits64(z64, *transform, TEMPERATURE)
    xt = logits64(teacher_hidden.double() @ teacher_weight.double().T, TEACHER["teacher_logit_scale"],
                  TEACHER["teacher_softcap"])  # the teacher at T = 1
    # topk_rkl's support: the top k of the raw logits, as the op takes it under a transform.
    expect = divergence64(objective, xs, xt, k=k, support_logits=z64.detach())
    expect_dh, expect_dw = torch.autograd.grad(0.7 * expect.sum() / 40.0, (h64, w64))
    close(divergence, expect, atol=2e-5, rtol=1e-4, what="divergence")
    close(student_lp, lp64(xs.detach(), targets), atol=2e-5, what="student_lp")
    grad_close(dhidden, expect_dh, 1e-4, "dhidden")
    grad_close(dweight, expect_dw, 1e-4, "dweight")


@pytest.mark.parametrize("k", [None, 11], ids=["full", "topk"])
@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_reverse_kl(backend, transform, k):
    n, v = 17, 203
    student, _ = wide_logits(n, v)
    teacher = 8.0 * torch.randn(n, v, device=DEVICE)
    options = dict(**transform_kw(transform), **TEACHER, **backend_options(backend, 5, block_v=64))
    if k is None:
        kl = kernels.full_reverse_kl(student, teacher, TEMPERATURE, **options)
    else:
        kl = kernels.topk_reverse_kl(student, teacher, k, TEMPERATURE, **options)
    grad_out = torch.randn(n, device=DEVICE)
    (dstudent,) = torch.autograd.grad(kl, student, grad_out)

    (z64,) = float64_leaves(student)
    xs = logits64(z64, *transform, TEMPERATURE)
    xt = logits64(teacher, TEACHER["teacher_logit_scale"], TEACHER["teacher_softcap"], TEMPERATURE)
    # The support on the raw student logits, as the ops take it (the same set: both transforms increase).
    expect = divergence64("full_rkl" if k is None else "topk_rkl", xs, xt, k=k, support_logits=z64.detach())
    (expect_grad,) = torch.autograd.grad(expect, z64, grad_out.double())
    close(kl, expect, atol=1e-5, rtol=1e-4, what="kl")
    grad_close(dstudent, expect_grad, 1e-4, "dstudent")


@pytest.mark.triton
def test_small_n_hands_the_transform_to_the_chunked_path(monkeypatch):
    # On a GPU an N too small to fill it runs the chunked path: the transform must go with it.
    module = importlib.import_module("kernels.triton.linear_logprob")
    monkeypatch.setattr(module, "_use_chunked_path", lambda hidden, tiles: True)
    n, h, v = 9, 16, 101
    transform = TRANSFORMS[2]
    hidden, weight, targets = linear_inputs(n, h, v, torch.float32, weight_scale=1.5)
    h64, w64 = float64_leaves(hidden, weight)
    s64 = lp64(logits64(h64 @ w64.T, *transform, TEMPERATURE), targets).detach()
    lp = kernels.linear_token_logprobs(
        hidden, weight, targets, TEMPERATURE, backend="triton", **transform_kw(transform)
    )
    _, student_lp = kernels.linear_opd_loss(
        hidden, weight, targets, s64.float(), s64.float(), normalizer=n, temperature=TEMPERATURE, backend="triton",
        **transform_kw(transform),
    )
    close(lp, s64, atol=2e-5, what="chunked logprob")
    close(student_lp, s64, atol=2e-5, what="chunked student_lp")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(logit_scale=0.0), "logit_scale must be finite and > 0"),
        (dict(logit_scale=float("nan")), "logit_scale must be finite and > 0"),
        (dict(softcap=-30.0), "softcap must be None or finite and > 0"),
        (dict(teacher_softcap=0.0), "teacher_softcap must be None or finite and > 0"),
    ],
)
def test_a_bad_transform_is_refused_before_any_launch(backend, options, message):
    logits, targets = wide_logits(4, 11)
    hidden, weight, lin_targets = linear_inputs(4, 16, 11, torch.float32)
    student_only = {key: value for key, value in options.items() if not key.startswith("teacher_")}
    calls = [lambda: kernels.full_reverse_kl(logits, logits.detach(), backend=backend, **options)]
    if student_only:
        calls += [
            lambda: kernels.token_logprobs(logits, targets, backend=backend, **student_only),
            lambda: kernels.linear_token_logprobs(hidden, weight, lin_targets, backend=backend, **student_only),
        ]
    else:
        calls.append(lambda: kernels.linear_divergence_loss(
            hidden, weight, hidden, weight, lin_targets, objective="fkl", normalizer=4.0, **options
        ))
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()

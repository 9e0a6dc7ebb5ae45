"""The chunked torch reference equals the unchunked float64 math, and the OPD loss gradient equals its closed form.

Inputs are fresh random draws each run; the seed is printed (shown on failure), OPD_TEST_SEED replays one.
"""

from __future__ import annotations


import pytest
import torch

import kernels
from kernels import reference

V = 1001  # odd, so no chunk or tile divides it


pytestmark = pytest.mark.usefixtures("random_seed")


# --- float64 unchunked oracles ------------------------------------------------------------------


def lp64(logits, targets, temperature=1.0):
    return torch.log_softmax(logits.double() / temperature, dim=-1).gather(1, targets[:, None]).squeeze(1)


def opd64(student_lp, teacher_lp, rollout_lp, kl_coef, cap, normalizer, importance_ratio=True):
    """The loss as autograd sees it; with importance_ratio=False that is -sum(A * student_lp)/N,
    whose gradient the kernel follows while it reports the value -sum(A)/N."""
    advantage = kl_coef * (teacher_lp.double() - rollout_lp.double())
    if importance_ratio:
        ratio = torch.exp(torch.clamp(student_lp - rollout_lp.double(), max=cap))
        return -(ratio * advantage).sum() / normalizer
    return -(advantage * student_lp).sum() / normalizer


def make_logits(n, v, kind, dtype=torch.float32):
    if kind == "peaked":
        # One class dominates by ~40 nats: p(target) -> 1 in fp32.
        logits = torch.randn(n, v)
        targets = torch.randint(0, v, (n,))
        logits[torch.arange(n), targets] += 40.0
    elif kind == "flat":
        logits = 1e-3 * torch.randn(n, v)
        targets = torch.randint(0, v, (n,))
    else:
        logits = 3.0 * torch.randn(n, v)
        targets = torch.randint(0, v, (n,))
    return logits.to(dtype), targets


def close(actual, expected, atol, rtol=0.0, what=""):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# --- token_logprobs -----------------------------------------------------------------------------

GRID = [
    # n, chunk, temperature, kind
    (1, 1024, 1.0, "normal"),
    (1, 1, 0.7, "peaked"),
    (37, 8, 1.0, "normal"),  # chunk < N, does not divide N
    (37, 5, 1.3, "flat"),
    (37, 7, 0.6, "peaked"),
    (64, 64, 2.0, "normal"),
]


@pytest.mark.parametrize("n,chunk,temperature,kind", GRID)
def test_token_logprobs_fp32_equals_float64(n, chunk, temperature, kind):
    logits, targets = make_logits(n, V, kind)
    logits.requires_grad_(True)
    lp = kernels.token_logprobs(logits, targets, temperature, chunk_tokens=chunk)
    assert lp.dtype == torch.float32 and lp.shape == (n,)
    grad_out = torch.randn(n)
    (dlogits,) = torch.autograd.grad(lp, logits, grad_out)

    x64 = logits.detach().double().requires_grad_(True)
    expect = lp64(x64, targets, temperature)
    (expect_grad,) = torch.autograd.grad(expect, x64, grad_out.double())
    scale = logits.detach().abs().max().item() / temperature
    close(lp, expect, atol=2e-6 * max(1.0, scale), what="logprob")
    close(dlogits, expect_grad, atol=1e-6, rtol=1e-4, what="dlogits")


def test_target_gradient_keeps_precision_when_p_target_near_one():
    # d logp(y)/d x_y = 1 - p(y) ~ 1e-17 here; 1 - p(y) in fp32 would be exactly 0.
    logits, targets = make_logits(16, V, "peaked")
    logits.requires_grad_(True)
    lp = reference.token_logprobs(logits, targets, chunk_tokens=5)
    (dlogits,) = torch.autograd.grad(lp.sum(), logits)
    got = dlogits.gather(1, targets[:, None]).squeeze(1).double()
    p64 = torch.softmax(logits.detach().double(), dim=-1)
    expect = (p64 * (torch.nn.functional.one_hot(targets, V) == 0)).sum(-1)  # 1 - p(y), no fp64 cancellation
    assert (expect > 0).all() and (expect < 1e-12).all()
    close(got, expect, atol=0.0, rtol=1e-4, what="target-class gradient")


def test_token_logprobs_bf16():
    # bf16 logits are exact in fp32, so the value matches to fp32 rounding; dlogits is written in bf16
    # (8 mantissa bits), so the gradient matches to 2^-8 relative.
    logits, targets = make_logits(50, V, "normal", torch.bfloat16)
    logits.requires_grad_(True)
    lp = kernels.token_logprobs(logits, targets, 0.8, chunk_tokens=16)
    grad_out = torch.randn(50)
    (dlogits,) = torch.autograd.grad(lp, logits, grad_out)
    assert lp.dtype == torch.float32 and dlogits.dtype == torch.bfloat16
    x64 = logits.detach().double().requires_grad_(True)
    expect = lp64(x64, targets, 0.8)
    (expect_grad,) = torch.autograd.grad(expect, x64, grad_out.double())
    close(lp, expect, atol=1e-5, what="bf16 logprob")
    close(dlogits, expect_grad, atol=1e-3 * grad_out.abs().max().item(), rtol=1e-2, what="bf16 dlogits")


def test_token_logprobs_gradcheck():
    logits = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (6,))
    assert torch.autograd.gradcheck(lambda x: reference.token_logprobs(x, targets, 0.7, chunk_tokens=4), (logits,))


# --- linear_token_logprobs ----------------------------------------------------------------------


@pytest.mark.parametrize("n,chunk,temperature", [(1, 1024, 1.0), (37, 8, 0.7), (40, 40, 1.5)])
def test_linear_token_logprobs_fp32_equals_float64(n, chunk, temperature):
    h = 24
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (0.5 * torch.randn(V, h)).requires_grad_(True)
    targets = torch.randint(0, V, (n,))
    lp = kernels.linear_token_logprobs(hidden, weight, targets, temperature, chunk_tokens=chunk)
    grad_out = torch.randn(n)
    dhidden, dweight = torch.autograd.grad(lp, (hidden, weight), grad_out)

    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    expect = lp64(h64 @ w64.T, targets, temperature)
    expect_dh, expect_dw = torch.autograd.grad(expect, (h64, w64), grad_out.double())
    close(lp, expect, atol=2e-5, what="logprob")
    close(dhidden, expect_dh, atol=2e-5, rtol=1e-4, what="dhidden")
    close(dweight, expect_dw, atol=2e-5, rtol=1e-4, what="dweight")


def test_linear_token_logprobs_bf16():
    # Matmuls run in bf16, so logits carry ~2^-8 relative error: tolerances are bf16-sized.
    n, h = 40, 32
    hidden = torch.randn(n, h).bfloat16().requires_grad_(True)
    weight = (0.2 * torch.randn(V, h)).bfloat16().requires_grad_(True)
    targets = torch.randint(0, V, (n,))
    lp = kernels.linear_token_logprobs(hidden, weight, targets, chunk_tokens=9)
    dhidden, dweight = torch.autograd.grad(lp.sum(), (hidden, weight))
    assert lp.dtype == torch.float32 and dhidden.dtype == dweight.dtype == torch.bfloat16

    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    expect = lp64(h64 @ w64.T, targets)
    expect_dh, expect_dw = torch.autograd.grad(expect.sum(), (h64, w64))
    close(lp, expect, atol=5e-2, what="bf16 logprob")
    close(dhidden, expect_dh, atol=2e-2, rtol=2e-2, what="bf16 dhidden")
    close(dweight, expect_dw, atol=2e-2, rtol=2e-2, what="bf16 dweight")


def test_linear_token_logprobs_gradcheck():
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (5,))
    fn = lambda hd, w: reference.linear_token_logprobs(hd, w, targets, 1.3, chunk_tokens=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


# --- opd_loss -----------------------------------------------------------------------------------


def softmax_grad(logits, targets, grad_student_lp, temperature):
    """g_t * (onehot - softmax(x/T)) / T in float64."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    onehot = torch.nn.functional.one_hot(targets, logits.shape[1]).double()
    return grad_student_lp.double()[:, None] * (onehot - p) / temperature


@pytest.mark.parametrize("n,chunk,temperature", [(1, 1024, 1.0), (45, 8, 0.7), (45, 45, 1.0)])
def test_opd_gradient_at_rollout_policy_is_closed_form(n, chunk, temperature):
    # At theta = theta_rollout: ratio = 1, d loss / d student_lp_t = kl_coef * (rollout_lp_t - teacher_lp_t) / N_active.
    kl_coef, normalizer = 0.7, 3.0 * n + 5
    logits, targets = make_logits(n, V, "normal", torch.float64)
    logits.requires_grad_(True)
    rollout_lp = lp64(logits.detach(), targets, temperature)
    teacher_lp = rollout_lp + torch.randn(n, dtype=torch.float64)
    loss, student_lp = reference.opd_loss(
        logits, targets, teacher_lp, rollout_lp,
        kl_coef=kl_coef, log_ratio_cap=2.0, normalizer=normalizer, temperature=temperature, chunk_tokens=chunk,
    )
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
            return reference.opd_loss(
                x, targets, teacher_lp, rollout_lp,
                kl_coef=kl_coef, normalizer=normalizer, temperature=temperature, chunk_tokens=chunk,
            )[0]

    fd = (value(logits + eps * direction) - value(logits - eps * direction)) / (2 * eps)
    close(fd, (dlogits * direction).sum(), atol=1e-7, rtol=1e-5, what="finite difference")


def test_opd_cap_zeroes_gradient_above_cap():
    n, cap, normalizer, temperature = 40, 0.5, 100.0, 0.9
    logits, targets = make_logits(n, V, "normal")
    logits.requires_grad_(True)
    lp = lp64(logits.detach(), targets, temperature)
    # log_ratio = student_lp - rollout_lp: a third of the tokens above the cap, none within fp32 error of it.
    side = torch.where(torch.arange(n) % 3 == 0, 1.0, -1.0).double()
    log_ratio = cap + side * (0.01 + torch.rand(n, dtype=torch.float64))
    rollout_lp = (lp - log_ratio).float()
    teacher_lp = rollout_lp + torch.randn(n)
    loss, student_lp = kernels.opd_loss(
        logits, targets, teacher_lp, rollout_lp,
        log_ratio_cap=cap, normalizer=normalizer, temperature=temperature, chunk_tokens=6,
    )
    (dlogits,) = torch.autograd.grad(loss, logits)

    s64 = lp64(logits.detach(), targets, temperature).requires_grad_(True)
    expect = opd64(s64, teacher_lp, rollout_lp, 1.0, cap, normalizer)
    (expect_g,) = torch.autograd.grad(expect, s64)
    above = (s64.detach() - rollout_lp.double()) > cap
    assert above.any() and (~above).any()
    assert (dlogits[above] == 0).all()
    close(loss, expect, atol=1e-5, rtol=1e-5, what="capped loss")
    close(dlogits, softmax_grad(logits.detach(), targets, expect_g, temperature), atol=1e-6, rtol=1e-4, what="dlogits")


def test_opd_without_importance_ratio():
    n, kl_coef, normalizer = 30, 1.5, torch.tensor(77.0)  # normaliser as a 0-d tensor
    logits, targets = make_logits(n, V, "normal", torch.float64)
    logits.requires_grad_(True)
    rollout_lp = lp64(logits.detach(), targets) - torch.rand(n, dtype=torch.float64)  # far from theta_rollout
    teacher_lp = rollout_lp + torch.randn(n, dtype=torch.float64)
    loss, _ = kernels.opd_loss(
        logits, targets, teacher_lp, rollout_lp,
        kl_coef=kl_coef, normalizer=normalizer, importance_ratio=False, chunk_tokens=7,
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
    fn = lambda x: reference.opd_loss(  # noqa: E731
        x, targets, teacher_lp, rollout_lp, kl_coef=0.5, log_ratio_cap=0.3, normalizer=11.0, temperature=1.2,
        chunk_tokens=3,
    )[0]
    assert torch.autograd.gradcheck(fn, (logits,))


def test_opd_loss_bf16_and_outer_scale():
    n, normalizer = 50, 80.0
    logits, targets = make_logits(n, V, "normal", torch.bfloat16)
    logits.requires_grad_(True)
    rollout_lp = lp64(logits.detach(), targets).float() + 0.1 * torch.randn(n)
    teacher_lp = rollout_lp + torch.randn(n)
    loss, student_lp = kernels.opd_loss(logits, targets, teacher_lp, rollout_lp, normalizer=normalizer, chunk_tokens=16)
    (dlogits,) = torch.autograd.grad(3.0 * loss, logits)  # backward scales the precomputed gradient
    assert loss.dtype == student_lp.dtype == torch.float32 and dlogits.dtype == torch.bfloat16

    s64 = lp64(logits.detach(), targets).requires_grad_(True)
    expect = opd64(s64, teacher_lp, rollout_lp, 1.0, 2.0, normalizer)
    (expect_g,) = torch.autograd.grad(3.0 * expect, s64)
    expect_grad = softmax_grad(logits.detach(), targets, expect_g, 1.0)
    close(student_lp, s64.detach(), atol=1e-5, what="bf16 student_lp")
    close(loss, expect, atol=1e-5, rtol=1e-5, what="bf16 loss")
    close(dlogits, expect_grad, atol=1e-2 * expect_grad.abs().max().item(), rtol=1e-2, what="bf16 dlogits")


def test_opd_second_backward_is_exact_or_refused():
    # The gradient is precomputed; an outer scale != 1 is applied in place, so a second backward
    # through the same graph must raise rather than return a doubly scaled gradient.
    logits, targets = make_logits(4, 17, "normal")
    logits.requires_grad_(True)
    loss, _ = reference.opd_loss(logits, targets, torch.zeros(4), torch.zeros(4) - 3, normalizer=4.0)
    first = torch.autograd.grad(loss, logits, retain_graph=True)[0].clone()
    close(torch.autograd.grad(loss, logits, retain_graph=True)[0], first, atol=0.0, what="second backward")
    torch.autograd.grad(3.0 * loss, logits, retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(loss, logits)


# --- linear_opd_loss ----------------------------------------------------------------------------


def linear_opd64(hidden, weight, targets, teacher_lp, rollout_lp, **kw):
    student_lp = lp64(hidden.double() @ weight.double().T, targets, kw.pop("temperature", 1.0))
    return opd64(student_lp, teacher_lp, rollout_lp, kw["kl_coef"], kw["log_ratio_cap"], kw["normalizer"],
                 kw.get("importance_ratio", True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("importance_ratio", [True, False])
def test_linear_opd_loss_equals_float64_autograd(dtype, importance_ratio):
    n, h, chunk = 37, 32, 8
    kw = dict(kl_coef=0.8, log_ratio_cap=0.4, normalizer=120.0, temperature=0.9, importance_ratio=importance_ratio)
    hidden = torch.randn(n, h).to(dtype).requires_grad_(True)
    weight = (0.3 * torch.randn(V, h)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (n,))
    base_lp = lp64(hidden.detach().double() @ weight.detach().double().T, targets, kw["temperature"]).float()
    # log_ratio = student_lp - rollout_lp on both sides of the cap, but >= 0.1 from it: bf16 matmul
    # error moves student_lp by ~1e-2, which must not flip a token across the cap.
    log_ratio = kw["log_ratio_cap"] + torch.where(torch.rand(n) < 0.3, 1.0, -1.0) * (0.1 + torch.rand(n))
    rollout_lp = base_lp - log_ratio
    teacher_lp = rollout_lp + torch.randn(n)

    loss, student_lp = kernels.linear_opd_loss(
        hidden, weight, targets, teacher_lp, rollout_lp, chunk_tokens=chunk, **kw
    )
    dhidden, dweight = torch.autograd.grad(loss, (hidden, weight))
    assert dhidden.dtype == dweight.dtype == dtype

    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    expect = linear_opd64(h64, w64, targets, teacher_lp, rollout_lp, **kw)
    expect_dh, expect_dw = torch.autograd.grad(expect, (h64, w64))
    # fp32: matmul rounding only. bf16: logits and gradients carry 2^-8 relative error.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    close(student_lp, base_lp, atol=tol * 5, what="student_lp")
    if not importance_ratio:
        expect = -kw["kl_coef"] * (teacher_lp.double() - rollout_lp.double()).sum() / kw["normalizer"]
    close(loss, expect, atol=tol, rtol=tol, what="loss")
    close(dhidden, expect_dh, atol=tol * expect_dh.abs().max().item(), rtol=tol * 10, what="dhidden")
    close(dweight, expect_dw, atol=tol * expect_dw.abs().max().item(), rtol=tol * 10, what="dweight")


def test_linear_opd_loss_frozen_weight_and_no_grad():
    n, h = 20, 8
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(V, h)  # frozen: no dW is computed or returned
    targets = torch.randint(0, V, (n,))
    rollout_lp = torch.randn(n) - 5
    teacher_lp = rollout_lp + torch.randn(n)
    loss, student_lp = kernels.linear_opd_loss(hidden, weight, targets, teacher_lp, rollout_lp, normalizer=n)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        loss2, student_lp2 = kernels.linear_opd_loss(hidden, weight, targets, teacher_lp, rollout_lp, normalizer=n)
    assert not loss2.requires_grad
    close(loss2, loss.detach(), atol=0.0, what="no_grad loss")
    close(student_lp2, student_lp, atol=0.0, what="no_grad student_lp")


# --- shapes and memory --------------------------------------------------------------------------


def test_shape_errors_are_clear():
    logits, targets = make_logits(5, 11, "normal")
    with pytest.raises(ValueError, match="targets"):
        kernels.token_logprobs(logits, targets[:4])
    with pytest.raises(ValueError, match="rollout_lp"):
        kernels.opd_loss(logits, targets, torch.zeros(5), torch.zeros(6), normalizer=5.0)
    with pytest.raises(ValueError, match="normalizer"):
        kernels.opd_loss(logits, targets, torch.zeros(5), torch.zeros(5), normalizer=0.0)
    with pytest.raises(ValueError, match="H differs"):
        kernels.linear_token_logprobs(torch.randn(5, 4), torch.randn(11, 3), targets)
    with pytest.raises(ValueError, match="logits"):
        kernels.token_logprobs(logits[None], targets)


def test_chunked_path_never_allocates_n_by_v():
    dispatch = pytest.importorskip("torch.utils._python_dispatch")
    n, h, v, chunk = 64, 4, 257, 8  # h < chunk, so weight.T [H, V] is not mistaken for [N, V]
    big = []

    class RecordLarge(dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] == v \
                        and t.shape[0] > chunk:
                    big.append((str(func), tuple(t.shape)))
            return out

    logits = torch.randn(n, v).bfloat16().requires_grad_(True)  # the [N, V] gradient is bf16, not fp32
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    lp = torch.randn(n)
    with RecordLarge():
        reference.token_logprobs(logits, targets, chunk_tokens=chunk).sum().backward()
        reference.opd_loss(logits, targets, lp, lp, normalizer=n, chunk_tokens=chunk)[0].backward()
        reference.linear_token_logprobs(hidden, weight, targets, chunk_tokens=chunk).sum().backward()
        reference.linear_opd_loss(hidden, weight, targets, lp, lp, normalizer=n, chunk_tokens=chunk)[0].backward()
    assert big == []

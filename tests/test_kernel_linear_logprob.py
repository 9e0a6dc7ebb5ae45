"""linear_token_logprobs and linear_opd_loss on hidden [N, H] and lm_head weight [V, H], each backend against
float64 autograd in value, dH and dW; and the Triton path's tiles, determinism and small-N hand-off.

Float buffers the ops allocate are NaN-poisoned. Tiles (Triton) and chunks (torch) divide neither N, H nor V.
Inputs are fresh random draws; the printed OPD_TEST_SEED replays one.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import kernels
import kernels.torch_ops.linear_logprob as chunked
from oracles import (
    DEVICE, LINEAR_TOL, TINY_TILES, V, V_SMALL, backend_options, close, float64_leaves, linear_inputs, lp64, opd64, opd_inputs,
    reinforce_value64,
)

pytestmark = [
    pytest.mark.usefixtures("random_seed", "poisoned_allocations"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # masked interpreter lanes: -inf - -inf, log(0)
]


def triton_linear():
    """The Triton module, imported only by tests that run it (`import kernels` never does)."""
    return importlib.import_module("kernels.triton.linear_logprob")


@pytest.mark.parametrize(
    "n,h,v,temperature,chunk_tokens,dtype,weight_scale",
    [
        (1, 24, V, 1.0, 1024, torch.float32, 0.5),
        (37, 40, V_SMALL, 0.7, 8, torch.float32, 0.3),
        (40, 24, V, 1.5, 40, torch.float32, 0.5),
        (37, 64, V, 1.5, 9, torch.bfloat16, 0.3),
        (40, 32, V, 1.0, 9, torch.bfloat16, 0.2),
    ],
)
def test_linear_token_logprobs_equals_float64_autograd(backend, n, h, v, temperature, chunk_tokens, dtype, weight_scale):
    hidden, weight, targets = linear_inputs(n, h, v, dtype, weight_scale)
    lp = kernels.linear_token_logprobs(
        hidden, weight, targets, temperature, **backend_options(backend, chunk_tokens, tiles=TINY_TILES)
    )
    grad_out = torch.randn(n, device=DEVICE)
    dhidden, dweight = torch.autograd.grad(lp, (hidden, weight), grad_out)
    assert lp.dtype == torch.float32 and dhidden.dtype == dweight.dtype == dtype

    h64, w64 = float64_leaves(hidden, weight)
    expect = lp64(h64 @ w64.T, targets, temperature)
    expect_dh, expect_dw = torch.autograd.grad(expect, (h64, w64), grad_out.double())
    lp_atol, tol = LINEAR_TOL[backend, dtype]
    close(lp, expect, atol=lp_atol, what="logprob")
    close(dhidden, expect_dh, atol=tol * expect_dh.abs().max().item(), rtol=tol, what="dhidden")
    close(dweight, expect_dw, atol=tol * expect_dw.abs().max().item(), rtol=tol, what="dweight")


def test_linear_token_logprobs_gradcheck():
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (5,))
    fn = lambda hd, w: kernels.linear_token_logprobs(hd, w, targets, 1.3, backend="torch", chunk_tokens=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


# (student_lp atol, loss atol = rtol, gradient atol per max |expected|, gradient rtol) by backend and dtype.
LINEAR_OPD_TOL = {
    ("torch", torch.float32): (5e-5, 1e-5, 1e-5, 1e-4),
    ("triton", torch.float32): (1e-4, 1e-5, 2e-5, 2e-5),
    ("torch", torch.bfloat16): (1e-1, 2e-2, 2e-2, 2e-1),
    ("triton", torch.bfloat16): (1e-4, 1e-5, 1.5e-2, 1.5e-2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("importance_ratio", [True, False])
def test_linear_opd_loss_equals_float64_autograd(backend, dtype, importance_ratio, monkeypatch):
    if backend == "triton":
        monkeypatch.setattr(triton_linear(), "DH_CHUNK_ROWS", 16)  # several dH launches, the last one partial
    n, h = 37, 48
    kw = dict(kl_coef=0.8, log_ratio_cap=0.4, normalizer=120.0, temperature=0.9, importance_ratio=importance_ratio)
    hidden, weight, targets = linear_inputs(n, h, V_SMALL, dtype)
    h64, w64 = float64_leaves(hidden, weight)
    # log_ratio >= 0.1 from the cap: bf16 matmul error moves student_lp by ~1e-2, which must not flip a token.
    teacher_lp, rollout_lp = opd_inputs(h64.detach() @ w64.detach().T, targets, kw["temperature"],
                                        kw["log_ratio_cap"], margin=0.1)

    loss, student_lp = kernels.linear_opd_loss(
        hidden, weight, targets, teacher_lp, rollout_lp, **backend_options(backend, 8, tiles=TINY_TILES), **kw
    )
    dhidden, dweight = torch.autograd.grad(loss, (hidden, weight))
    assert dhidden.dtype == dweight.dtype == dtype and not student_lp.requires_grad

    s64 = lp64(h64 @ w64.T, targets, kw["temperature"])
    expect = opd64(s64, teacher_lp, rollout_lp, kw["kl_coef"], kw["log_ratio_cap"], kw["normalizer"], importance_ratio)
    expect_dh, expect_dw = torch.autograd.grad(expect, (h64, w64))
    if not importance_ratio:
        expect = reinforce_value64(teacher_lp, rollout_lp, kw["kl_coef"], kw["normalizer"])
    lp_atol, loss_tol, grad_atol, grad_rtol = LINEAR_OPD_TOL[backend, dtype]
    close(student_lp, s64.detach(), atol=lp_atol, what="student_lp")
    close(loss, expect, atol=loss_tol, rtol=loss_tol, what="loss")
    close(dhidden, expect_dh, atol=grad_atol * expect_dh.abs().max().item(), rtol=grad_rtol, what="dhidden")
    close(dweight, expect_dw, atol=grad_atol * expect_dw.abs().max().item(), rtol=grad_rtol, what="dweight")


@pytest.mark.parametrize("h,v", [(8, V), (32, V_SMALL)])  # H = 8 is narrower than any BLOCK_H
def test_linear_opd_loss_frozen_weight_outer_scale_and_no_grad(backend, h, v):
    n = 20
    hidden, weight, targets = linear_inputs(n, h, v, torch.float32)
    weight = weight.detach()  # frozen: no dW is computed or returned
    rollout_lp = torch.randn(n, device=DEVICE) - 5
    teacher_lp = rollout_lp + torch.randn(n, device=DEVICE)
    args = (hidden, weight, targets, teacher_lp, rollout_lp)
    options = backend_options(backend, 6, tiles=TINY_TILES)
    loss, student_lp = kernels.linear_opd_loss(*args, normalizer=n, **options)
    (2.5 * loss).backward()
    assert hidden.grad is not None and weight.grad is None

    (h64,) = float64_leaves(hidden)
    s64 = lp64(h64 @ weight.double().T, targets)
    (expect_dh,) = torch.autograd.grad(2.5 * opd64(s64, teacher_lp, rollout_lp, 1.0, 2.0, n), h64)
    close(hidden.grad, expect_dh, atol=1e-6, rtol=1e-4, what="scaled dhidden")
    with torch.no_grad():
        loss2, student_lp2 = kernels.linear_opd_loss(*args, normalizer=n, **options)
    assert not loss2.requires_grad
    close(loss2, loss.detach(), atol=0.0, what="no_grad loss")
    close(student_lp2, student_lp, atol=0.0, what="no_grad student_lp")


@pytest.mark.triton
def test_every_autotuning_candidate_equals_float64():
    # The autotuner may pick any candidate on a GPU: each must compute the same function, tails included.
    tiles_module = importlib.import_module("kernels.triton.linear_tiles")
    n, h = 150, 80  # neither divides by any candidate's BLOCK_N or BLOCK_H
    for tiles in sorted(set(tiles_module.FWD_TILE_CANDIDATES + tiles_module.GRAD_TILE_CANDIDATES)):
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


@pytest.mark.triton
def test_linear_gradients_are_deterministic():
    hidden, weight, targets = linear_inputs(33, 32, 200, torch.bfloat16)
    runs = []
    for _ in range(2):
        lp = kernels.linear_token_logprobs(hidden, weight, targets, backend="triton", tiles=TINY_TILES)
        runs.append(torch.autograd.grad(lp.sum(), (hidden, weight)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.triton
def test_small_n_runs_the_chunked_path_with_the_same_arguments(monkeypatch):
    """Row-block grids need one block per SM; smaller N (shared-prefix teacher scoring: ~256 rows) runs the
    chunked cuBLAS path, which must get every argument of the call."""
    module = triton_linear()
    fills_gpu = importlib.import_module("kernels.triton.linear_tiles").fills_gpu
    assert not fills_gpu(256, 132) and fills_gpu(132 * 64, 132)
    calls = []
    for name in ("linear_token_logprobs", "linear_opd_loss"):
        real = getattr(chunked, name)
        monkeypatch.setattr(chunked, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    monkeypatch.setattr(module, "_use_chunked_path", lambda hidden, tiles: tiles is None)
    n, h = 21, 24
    kw = dict(kl_coef=0.8, log_ratio_cap=0.4, normalizer=50.0, temperature=0.9, importance_ratio=True)
    hidden, weight, targets = linear_inputs(n, h, V_SMALL, torch.float32)
    h64, w64 = float64_leaves(hidden, weight)
    teacher_lp, rollout_lp = opd_inputs(h64.detach() @ w64.detach().T, targets, kw["temperature"],
                                        kw["log_ratio_cap"], margin=0.05)
    lp = kernels.linear_token_logprobs(hidden, weight, targets, kw["temperature"], backend="triton")
    loss, student_lp = kernels.linear_opd_loss(hidden, weight, targets, teacher_lp, rollout_lp, backend="triton", **kw)
    assert calls == ["linear_token_logprobs", "linear_opd_loss"]
    s64 = lp64(h64 @ w64.T, targets, kw["temperature"])
    expect = opd64(s64, teacher_lp, rollout_lp, kw["kl_coef"], kw["log_ratio_cap"], kw["normalizer"])
    close(lp, s64.detach(), atol=2e-5, what="chunked logprob")
    close(student_lp, s64.detach(), atol=2e-5, what="chunked student_lp")
    close(loss, expect, atol=1e-5, rtol=1e-5, what="chunked loss")

"""Triton token log-probs and the fused sampled-token OPD loss on logits [N, V] (docs/design.md, "The step", 5-6).

Forward, per row i with x = logits[i] / T (fp32) and target y: lse = log sum_j exp(x_j) by an online
log-sum-exp (running max from -inf, running sum), lp = x_y - lse. With a logit scale or cap,
x = softcap(scale * logits[i]) / T (`common.transform`; SOFTCAP is a constexpr, so the plain kernels are
unchanged).
Gradient: d lp / d logits = (onehot - softmax) / T, whose target entry is written as sum_{j != y} p_j / T,
summed over the other classes, never as 1 - p_y; a scale multiplies it and a cap its slope sech^2. The OPD
loss chains d loss / d lp (`common.opd_row`, the math of `kernels.torch_ops.logprob`) through it, in forward.
Memory traffic:
- `token_logprobs`: forward reads logits once and writes lp, lse and `rest` = sum_{j != y} p_j (fp32 [N]);
  backward reads logits once and writes dlogits once, in the logits dtype.
- `opd_loss`: the forward reads logits twice (once if a row fits in one block) and writes dlogits once;
  backward only scales the saved dlogits. No fp32 [N, V] buffer is ever allocated.
Grids are 1-D over rows (CUDA caps grid y at 65535) and row offsets are int64 (N * V passes 2^31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.common import check_common, check_logits, check_opd, check_targets, check_transform, scale_grad
from kernels.triton.common import (
    DEFAULT_BLOCK_V, INTERPRET, check_dtype, guard_target, normalizer_rows, online_lse_update, opd_row, rowwise,
    softcap_slope, transform, transform_args,
)

# A row whose padded width fits this block is read once and kept in registers (opd_loss reads it once).
MAX_SINGLE_BLOCK = 128 if INTERPRET else 16384


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_x(row_ptr, c, V, inv_temp, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """(z, x) of one piece of a row: the logits in fp32 and x = softcap(scale z) / T, -inf past V."""
    z = tl.load(row_ptr + c, mask=c < V, other=float("-inf")).to(tl.float32)
    x = transform(z, inv_temp, cap_in, cap_out, SOFTCAP)
    if SOFTCAP:
        x = tl.where(c < V, x, float("-inf"))
    return z, x


@triton.jit
def _row_lse(row_ptr, target, V, inv_temp, cap_in, cap_out, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """(lse, x_y, rest) of one row read in BLOCK_V pieces; rest = sum_{j != y} softmax_j in fp32."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    s_rest = tl.zeros((), tl.float32)
    x_y = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        _, x = _load_x(row_ptr, c, V, inv_temp, cap_in, cap_out, SOFTCAP)
        is_target = c == target
        m, s, s_rest = online_lse_update(m, s, s_rest, x, is_target, 0)
        x_y += tl.sum(tl.where(is_target, x, 0.0), axis=0)
    return m + tl.log(s), x_y, s_rest / s


@triton.jit
def _dlogits(z, x, is_target, lse, rest, scale, cap_in, SOFTCAP: tl.constexpr):
    """scale * (onehot - softmax), target entry scale * rest, times the cap's slope under SOFTCAP."""
    d = tl.where(is_target, scale * rest, -scale * tl.exp(x - lse))
    if SOFTCAP:
        d = d * softcap_slope(z, cap_in)
    return d


@triton.jit
def _write_dlogits(
    row_ptr, drow_ptr, target, lse, rest, scale, V, inv_temp, cap_in, cap_out, SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """drow = d lp / d logits scaled (`_dlogits`): one more read of the row."""
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        z, x = _load_x(row_ptr, c, V, inv_temp, cap_in, cap_out, SOFTCAP)
        d = _dlogits(z, x, c == target, lse, rest, scale, cap_in, SOFTCAP)
        tl.store(drow_ptr + c, d.to(drow_ptr.dtype.element_ty), mask=c < V)


@triton.jit
def _logprob_fwd_kernel(
    logits_ptr, stride_row, targets_ptr, lp_ptr, lse_ptr, rest_ptr, V, inv_temp, cap_in, cap_out,
    SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    lse, x_y, rest = _row_lse(logits_ptr + row * stride_row, target, V, inv_temp, cap_in, cap_out, SOFTCAP, BLOCK_V)
    tl.store(lp_ptr + row, guard_target(x_y - lse, target, V))
    tl.store(lse_ptr + row, lse)
    tl.store(rest_ptr + row, rest)


@triton.jit
def _logprob_bwd_kernel(
    logits_ptr, stride_row, dlogits_ptr, dstride_row, targets_ptr, grad_ptr, lse_ptr, rest_ptr, V, inv_temp,
    cap_in, cap_out, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    scale = tl.load(grad_ptr + row) * inv_temp
    _write_dlogits(
        logits_ptr + row * stride_row, dlogits_ptr + row * dstride_row, target,
        tl.load(lse_ptr + row), tl.load(rest_ptr + row), scale, V, inv_temp, cap_in, cap_out, SOFTCAP, BLOCK_V,
    )


@triton.jit
def _opd_fwd_kernel(
    logits_ptr, stride_row, targets_ptr, teacher_lp_ptr, rollout_lp_ptr, normalizer_ptr, stride_norm,
    lp_ptr, loss_ptr, dlogits_ptr, dstride_row,
    V, inv_temp, cap_in, cap_out, kl_coef, log_ratio_cap,
    IMPORTANCE_RATIO: tl.constexpr, NEED_GRAD: tl.constexpr, SINGLE_BLOCK: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    if SINGLE_BLOCK:
        # The whole row stays in registers: logits are read once.
        cols = tl.arange(0, BLOCK_V)
        z, x = _load_x(row_ptr, cols, V, inv_temp, cap_in, cap_out, SOFTCAP)
        is_target = cols == target
        m, s, s_rest = online_lse_update(
            tl.full((), float("-inf"), tl.float32), tl.zeros((), tl.float32), tl.zeros((), tl.float32),
            x, is_target, 0,
        )
        lse = m + tl.log(s)
        rest = s_rest / s
        x_y = tl.sum(tl.where(is_target, x, 0.0), axis=0)
    else:
        lse, x_y, rest = _row_lse(row_ptr, target, V, inv_temp, cap_in, cap_out, SOFTCAP, BLOCK_V)
    student_lp = guard_target(x_y - lse, target, V)
    loss, grad = opd_row(
        student_lp, tl.load(teacher_lp_ptr + row), tl.load(rollout_lp_ptr + row),
        kl_coef, log_ratio_cap, tl.load(normalizer_ptr + row * stride_norm), IMPORTANCE_RATIO,
    )
    tl.store(lp_ptr + row, student_lp)
    tl.store(loss_ptr + row, loss)
    if NEED_GRAD:
        scale = grad * inv_temp
        drow_ptr = dlogits_ptr + row * dstride_row
        if SINGLE_BLOCK:
            d = _dlogits(z, x, is_target, lse, rest, scale, cap_in, SOFTCAP)
            tl.store(drow_ptr + cols, d.to(dlogits_ptr.dtype.element_ty), mask=cols < V)
        else:
            _write_dlogits(row_ptr, drow_ptr, target, lse, rest, scale, V, inv_temp, cap_in, cap_out, SOFTCAP, BLOCK_V)


# ---------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------


def _block_v(v: int, block_v: int | None) -> tuple[int, int]:
    """(BLOCK_V, num_warps): one block per row when it fits, else DEFAULT_BLOCK_V-wide pieces."""
    if block_v is None:
        width = triton.next_power_of_2(v)
        block_v = width if width <= MAX_SINGLE_BLOCK else DEFAULT_BLOCK_V
    block_v = triton.next_power_of_2(int(block_v))
    num_warps = max(1, min(16, block_v // 256))
    return block_v, num_warps


# ---------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, block_v, transform):
        n, v = logits.shape
        lp = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(lp)
        rest = torch.empty_like(lp)
        block, warps = _block_v(v, block_v)
        args = transform_args(temperature, *transform)
        softcap = transform[1] is not None
        if n:
            _logprob_fwd_kernel[(n,)](
                logits, logits.stride(0), targets, lp, lse, rest, v, *args, SOFTCAP=softcap, BLOCK_V=block,
                num_warps=warps,
            )
        ctx.save_for_backward(logits, targets, lse, rest)
        ctx.args, ctx.softcap, ctx.block, ctx.warps = args, softcap, block, warps
        return lp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp):
        logits, targets, lse, rest = ctx.saved_tensors
        n, v = logits.shape
        grad_lp = grad_lp.float().contiguous()
        dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if n:
            _logprob_bwd_kernel[(n,)](
                logits, logits.stride(0), dlogits, dlogits.stride(0), targets, grad_lp, lse, rest, v, *ctx.args,
                SOFTCAP=ctx.softcap, BLOCK_V=ctx.block, num_warps=ctx.warps,
            )
        return dlogits, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    block_v: int | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """log_softmax(logits / T)[i, targets[i]] -> fp32 [N]; differentiable in logits [N, V].

    `chunk_tokens` is accepted for the torch path's signature and unused: rows are independent programs.
    `block_v` overrides the vocab block (tests use it to cover the one-block and many-block paths).
    `logit_scale` and `softcap` transform the logits before T, as in `kernels.torch_ops.token_logprobs`.
    """
    check_logits(logits)
    check_common(logits.shape[0], targets, temperature, chunk_tokens or 1)
    check_dtype(logits, "token_logprobs")
    transform = check_transform(logit_scale, softcap)
    targets = check_targets(targets, logits.shape[1], logits.device)
    return _TokenLogprobs.apply(rowwise(logits), targets.contiguous(), float(temperature), block_v, transform)


# ---------------------------------------------------------------------------------------------
# opd_loss
# ---------------------------------------------------------------------------------------------


class _OPDLoss(torch.autograd.Function):
    """Forward writes dlogits (logits dtype) once; backward only scales it by d(outer)/d(loss)."""

    @staticmethod
    def forward(ctx, logits, targets, teacher_lp, rollout_lp, opts, need_grad):
        kl_coef, log_ratio_cap, normalizer, temperature, importance_ratio, block_v, logit_scale, softcap = opts
        n, v = logits.shape
        device = logits.device
        normalizer = normalizer_rows(normalizer, n, device)
        student_lp = torch.empty(n, dtype=torch.float32, device=device)
        loss_rows = torch.empty(n, dtype=torch.float32, device=device)  # summed in torch: deterministic
        dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format) if need_grad else None
        block, warps = _block_v(v, block_v)
        if n:
            _opd_fwd_kernel[(n,)](
                logits, logits.stride(0), targets, teacher_lp, rollout_lp, normalizer, normalizer.stride(0),
                student_lp, loss_rows, dlogits if need_grad else logits, dlogits.stride(0) if need_grad else 0,
                v, *transform_args(temperature, logit_scale, softcap), kl_coef, log_ratio_cap,
                IMPORTANCE_RATIO=importance_ratio, NEED_GRAD=need_grad, SINGLE_BLOCK=block >= v,
                SOFTCAP=softcap is not None, BLOCK_V=block, num_warps=warps,
            )
        ctx.save_for_backward(dlogits)
        ctx.mark_non_differentiable(student_lp)
        return loss_rows.sum(), student_lp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_student_lp):
        (dlogits,) = ctx.saved_tensors
        return scale_grad(dlogits, grad_loss), None, None, None, None, None


def opd_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_lp: torch.Tensor,
    rollout_lp: torch.Tensor,
    *,
    kl_coef: float = 1.0,
    log_ratio_cap: float = 2.0,
    normalizer: float | torch.Tensor,
    temperature: float = 1.0,
    importance_ratio: bool = True,
    chunk_tokens: int | None = None,
    block_v: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token OPD loss on logits [N, V] -> (loss fp32 scalar, student_lp fp32 [N], no grad).

    Same math and arguments as `kernels.torch_ops.logprob.opd_loss`; the gradient is written during forward.
    """
    check_logits(logits)
    n = logits.shape[0]
    check_common(n, targets, temperature, chunk_tokens or 1)
    check_opd(n, teacher_lp, rollout_lp, normalizer)
    check_dtype(logits, "opd_loss")
    transform = check_transform(logit_scale, softcap)
    targets = check_targets(targets, logits.shape[1], logits.device)
    # Float scalars go to the kernel as fp32 (Triton's type for a Python float); the normaliser as a
    # device tensor, so a 0-d tensor costs no host sync.
    opts = (float(kl_coef), float(log_ratio_cap), normalizer, float(temperature), bool(importance_ratio), block_v)
    opts += transform
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    return _OPDLoss.apply(
        rowwise(logits), targets.contiguous(), teacher_lp.detach().float().contiguous(),
        rollout_lp.detach().float().contiguous(), opts, need_grad,
    )

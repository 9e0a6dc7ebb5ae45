"""Triton fused-linear token log-probs and OPD loss on hidden [N, H] and lm_head weight [V, H] (docs/design.md, "The step", 5).

Math: x = (H W^T) / T, lp = x_y - logsumexp(x); d lp / d x = (onehot - softmax) / T, so with G = g d lp / d x
(g = d loss / d lp), dH = G W and dW = G^T H. With a logit scale or cap, x = softcap(scale H W^T) / T and G
carries scale and the cap's slope sech^2 (`common.transform`; SOFTCAP is a constexpr, so the plain kernels
are unchanged). [N, V] logits are never materialised: every kernel rebuilds
[BLOCK_N, BLOCK_V] logit tiles with tl.dot (fp32 accumulation) and folds them at once.
- forward (grid over row blocks): online log-sum-exp across vocab blocks -> lse, student_lp and
  rest = sum_{j != y} p_j, fp32 [N]; the OPD variant also writes d loss / d student_lp per row.
  Reads H once and W once per row block; FLOPs 2NVH.
- dH (grid over row blocks): rebuilds each tile, dlogits = g (onehot - softmax) / T (target entry
  g * rest / T, no 1 - p_y cancellation), cast to the input dtype like an autograd matmul would, then
  dH_blk += dlogits @ W_blk into an fp32 buffer that only this program touches. FLOPs 4NVH.
- dW (grid over vocab blocks): the same tiles, dW_blk += dlogits^T @ H_blk into an fp32 [V, H] buffer,
  walking row blocks in order. FLOPs 4NVH.
Both gradients are deterministic: each fp32 accumulator tile has one owner program that adds in a fixed
order (no atomics), at the price of rebuilding the logits once more than an atomics design (10NVH in all
against 8NVH). The accumulators live in global memory, read-modify-written once per tile (L2 traffic):
dH in fp32 at most DH_CHUNK_ROWS x H at a time (half-precision inputs), dW in fp32 [V, H].
Each program re-reads the whole of the other operand (W for row blocks, H for vocab blocks); programs of a
wave sweep it in step, so most of those reads should hit L2 (not yet measured on a GPU).
Occupancy: the forward and dH grids have cdiv(N, BLOCK_N) programs, so below one row block per SM most of
a GPU idles (shared-prefix teacher scoring: N ~ 256 is 4 programs on 132 SMs). Such N go to the chunked
cuBLAS path (`kernels.torch_ops.linear_logprob`, the same math), whose matmuls spread [N, H] x [H, V] over every SM.
The dW accumulator traffic is 8VH bytes per row block (read + write of fp32 [V, H]), N / BLOCK_N times:
at N = 16384, V = 151936, H = 4096 that is about 1.3 TB through L2/HBM against 4NVH = 4e13 FLOPs for the
dW matmuls, so dW is bound by it unless BLOCK_N grows; scripts/gpu_check.sh times it against the chunked path.
On a GPU, tiles are autotuned per (V, H, dtype) unless given (the candidates: `kernels.triton.linear_tiles`);
the gradient kernels' accumulators are re-zeroed between the tuning runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

import kernels.torch_ops.linear_logprob as chunked
from kernels.common import (
    DEFAULT_CHUNK_TOKENS, check_common, check_linear, check_opd, check_targets, check_transform, scale_grad,
)
from kernels.triton.common import (
    INTERPRET, check_dtype, dlogits_tile, guard_target, logits_tile, normalizer_rows, online_lse_update, opd_row,
    rowwise, to_dot, transform_args,
)
from kernels.triton.linear_tiles import (
    FWD_TILE_CANDIDATES, GRAD_TILE_CANDIDATES, autotuned, dot_args, fills_gpu, tile_kwargs,
)

# Rows per dH launch: bounds the fp32 dH accumulator at DH_CHUNK_ROWS x H.
DH_CHUNK_ROWS = 16384


@triton.jit
def _linear_fwd_kernel(
    h_ptr, stride_hn, w_ptr, stride_wv, targets_ptr, N, V, H, inv_temp, cap_in, cap_out,
    lp_ptr, lse_ptr, rest_ptr,
    teacher_lp_ptr, rollout_lp_ptr, normalizer_ptr, stride_norm, loss_ptr, grad_ptr, kl_coef, log_ratio_cap,
    OPD: tl.constexpr, IMPORTANCE_RATIO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    s_rest = tl.zeros((BLOCK_N,), tl.float32)
    x_y = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        x, _ = logits_tile(
            h_ptr, stride_hn, w_ptr, stride_wv, rows, cols, N, V, H, inv_temp, cap_in, cap_out, BLOCK_N, BLOCK_V,
            BLOCK_H, UPCAST, PRECISION, SOFTCAP,
        )
        is_target = cols[None, :] == target[:, None]
        m, s, s_rest = online_lse_update(m, s, s_rest, x, is_target, 1)
        x_y += tl.sum(tl.where(is_target, x, 0.0), axis=1)
    lse = m + tl.log(s)
    student_lp = guard_target(x_y - lse, target, V)
    tl.store(lp_ptr + rows, student_lp, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(rest_ptr + rows, s_rest / s, mask=row_ok)
    if OPD:
        loss, grad = opd_row(
            student_lp, tl.load(teacher_lp_ptr + rows, mask=row_ok, other=0.0),
            tl.load(rollout_lp_ptr + rows, mask=row_ok, other=0.0), kl_coef, log_ratio_cap,
            tl.load(normalizer_ptr + rows * stride_norm, mask=row_ok, other=1.0), IMPORTANCE_RATIO,
        )
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        tl.store(grad_ptr + rows, grad, mask=row_ok)


@triton.jit
def _linear_dh_kernel(
    h_ptr, stride_hn, w_ptr, stride_wv, targets_ptr, lse_ptr, rest_ptr, grad_ptr, dh_ptr, N, V, H, inv_temp,
    cap_in, cap_out,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    rest = tl.load(rest_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(grad_ptr + rows, mask=row_ok, other=0.0) * inv_temp  # 0 on padding rows: d = 0 there
    ks = tl.arange(0, BLOCK_H)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        x, slope = logits_tile(
            h_ptr, stride_hn, w_ptr, stride_wv, rows, cols, N, V, H, inv_temp, cap_in, cap_out, BLOCK_N, BLOCK_V,
            BLOCK_H, UPCAST, PRECISION, SOFTCAP,
        )
        d = dlogits_tile(
            x, slope, cols[None, :] == target[:, None], lse, rest, scale, h_ptr.dtype.element_ty, UPCAST, SOFTCAP
        )
        for k0 in range(0, H, BLOCK_H):
            k = k0 + ks
            k_ok = k < H
            w = tl.load(w_ptr + cols[:, None] * stride_wv + k[None, :], mask=(cols < V)[:, None] & k_ok[None, :],
                        other=0.0)
            acc_ptrs = dh_ptr + rows[:, None] * H + k[None, :]
            acc_mask = row_ok[:, None] & k_ok[None, :]
            part = tl.dot(d, to_dot(w, UPCAST), input_precision=PRECISION)
            tl.store(acc_ptrs, tl.load(acc_ptrs, mask=acc_mask, other=0.0) + part, mask=acc_mask)
        # The next vocab block reads these accumulators back: order the CTA's stores before those loads.
        tl.debug_barrier()


@triton.jit
def _linear_dw_kernel(
    h_ptr, stride_hn, w_ptr, stride_wv, targets_ptr, lse_ptr, rest_ptr, grad_ptr, dw_ptr, N, V, H, inv_temp,
    cap_in, cap_out,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    ks = tl.arange(0, BLOCK_H)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        rest = tl.load(rest_ptr + rows, mask=row_ok, other=0.0)
        scale = tl.load(grad_ptr + rows, mask=row_ok, other=0.0) * inv_temp
        x, slope = logits_tile(
            h_ptr, stride_hn, w_ptr, stride_wv, rows, cols, N, V, H, inv_temp, cap_in, cap_out, BLOCK_N, BLOCK_V,
            BLOCK_H, UPCAST, PRECISION, SOFTCAP,
        )
        d = dlogits_tile(
            x, slope, cols[None, :] == target[:, None], lse, rest, scale, h_ptr.dtype.element_ty, UPCAST, SOFTCAP
        )
        dt = tl.trans(d)  # [BLOCK_V, BLOCK_N]
        for k0 in range(0, H, BLOCK_H):
            k = k0 + ks
            k_ok = k < H
            h = tl.load(h_ptr + rows[:, None] * stride_hn + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc_ptrs = dw_ptr + cols[:, None] * H + k[None, :]
            acc_mask = col_ok[:, None] & k_ok[None, :]
            part = tl.dot(dt, to_dot(h, UPCAST), input_precision=PRECISION)
            tl.store(acc_ptrs, tl.load(acc_ptrs, mask=acc_mask, other=0.0) + part, mask=acc_mask)
        tl.debug_barrier()


# The gradient kernels add into their accumulators: every tuning run must start from zeros, and so must
# the launch that follows the tuning (the autotuner zeroes reset_to_zero arguments after benchmarking).
_TUNED = {
    "fwd": autotuned(_linear_fwd_kernel, FWD_TILE_CANDIDATES),
    "dh": autotuned(_linear_dh_kernel, GRAD_TILE_CANDIDATES, reset_to_zero=["dh_ptr"]),
    "dw": autotuned(_linear_dw_kernel, GRAD_TILE_CANDIDATES, reset_to_zero=["dw_ptr"]),
}
_PLAIN = {"fwd": _linear_fwd_kernel, "dh": _linear_dh_kernel, "dw": _linear_dw_kernel}


def _kernel(name: str, tiles: dict | None):
    """(kernel, tile kwargs): the autotuned kernel when no tiles are fixed, else the plain one with them."""
    return (_TUNED[name], {}) if tiles is None else (_PLAIN[name], tiles)


def _use_chunked_path(hidden: torch.Tensor, tiles) -> bool:
    """Small N on a GPU runs the chunked cuBLAS path; fixed tiles (tests, benchmarks) always run the kernels."""
    if tiles is not None or INTERPRET or not hidden.is_cuda:
        return False
    return not fills_gpu(hidden.shape[0], torch.cuda.get_device_properties(hidden.device).multi_processor_count)


def _forward(hidden, weight, targets, logit_args, tiles, opd=None):
    """lp, lse, rest fp32 [N]; with opd=(teacher_lp, rollout_lp, normalizer, kl, cap, ratio) also loss rows and grad.
    `logit_args` = (inv_temp, cap_in, cap_out, softcap): `common.transform_args` and whether there is a cap."""
    n, h = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    lp, lse, rest = (torch.empty(n, dtype=torch.float32, device=device) for _ in range(3))
    loss_rows = grad = None
    if opd is None:
        opd_args = (lp, lp, lp, 0, lp, lp, 0.0, 0.0)  # unused pointers
        opd_flags = dict(OPD=False, IMPORTANCE_RATIO=False)
    else:
        teacher_lp, rollout_lp, normalizer, kl_coef, log_ratio_cap, importance_ratio = opd
        loss_rows = torch.empty(n, dtype=torch.float32, device=device)
        grad = torch.empty(n, dtype=torch.float32, device=device)
        opd_args = (teacher_lp, rollout_lp, normalizer, normalizer.stride(0), loss_rows, grad, kl_coef, log_ratio_cap)
        opd_flags = dict(OPD=True, IMPORTANCE_RATIO=importance_ratio)
    if n:
        kernel, tile_args = _kernel("fwd", tiles)
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            hidden, hidden.stride(0), weight, weight.stride(0), targets, n, v, h, *logit_args[:3], lp, lse, rest,
            *opd_args, **opd_flags, **tile_args, **dot_args(hidden.dtype), SOFTCAP=logit_args[3],
        )
    return lp, lse, rest, loss_rows, grad


def _grads(hidden, weight, targets, lse, rest, grad, logit_args, tiles, need_dh, need_dw):
    """dH (hidden dtype) and dW (weight dtype), each summed in fp32; None where not needed."""
    n, h = hidden.shape
    v = weight.shape[0]
    dhidden = dweight = None
    if need_dh:
        dhidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        acc = None if hidden.dtype == torch.float32 else torch.empty(min(n, DH_CHUNK_ROWS), h, device=hidden.device)
        for s in range(0, n, DH_CHUNK_ROWS):
            e = min(s + DH_CHUNK_ROWS, n)
            out = dhidden[s:e] if acc is None else acc[: e - s]
            out.zero_()
            kernel, tile_args = _kernel("dh", tiles)
            kernel[lambda meta: (triton.cdiv(e - s, meta["BLOCK_N"]),)](
                hidden[s:], hidden.stride(0), weight, weight.stride(0), targets[s:], lse[s:], rest[s:], grad[s:],
                out, e - s, v, h, *logit_args[:3], **tile_args, **dot_args(hidden.dtype), SOFTCAP=logit_args[3],
            )
            if acc is not None:
                dhidden[s:e] = out
    if need_dw:
        dweight = torch.zeros(v, h, dtype=torch.float32, device=weight.device)
        if n:
            kernel, tile_args = _kernel("dw", tiles)
            kernel[lambda meta: (triton.cdiv(v, meta["BLOCK_V"]),)](
                hidden, hidden.stride(0), weight, weight.stride(0), targets, lse, rest, grad, dweight, n, v, h,
                *logit_args[:3], **tile_args, **dot_args(hidden.dtype), SOFTCAP=logit_args[3],
            )
        dweight = dweight.to(weight.dtype)
    return dhidden, dweight


def _prepare(hidden, weight, targets, temperature, chunk_tokens):
    check_linear(hidden, weight)
    check_common(hidden.shape[0], targets, temperature, chunk_tokens or 1)
    check_dtype(hidden, "fused-linear op")
    targets = check_targets(targets, weight.shape[0], hidden.device)
    return rowwise(hidden), rowwise(weight), targets.contiguous()


def _logit_args(temperature: float, transform: tuple[float, float | None]) -> tuple:
    return (*transform_args(temperature, *transform), transform[1] is not None)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, tiles, transform):
        tiles = tile_kwargs(tiles)
        logit_args = _logit_args(temperature, transform)
        lp, lse, rest, _, _ = _forward(hidden, weight, targets, logit_args, tiles)
        ctx.save_for_backward(hidden, weight, targets, lse, rest)
        ctx.logit_args, ctx.tiles = logit_args, tiles
        return lp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp):
        hidden, weight, targets, lse, rest = ctx.saved_tensors
        dhidden, dweight = _grads(
            hidden, weight, targets, lse, rest, grad_lp.float().contiguous(), ctx.logit_args, ctx.tiles,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        return dhidden, dweight, None, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    tiles: tuple[int, int, int, int] | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """log_softmax(hidden @ weight.T / T)[i, targets[i]] -> fp32 [N], never materialising [N, V].

    Differentiable in hidden and weight. `chunk_tokens` is accepted for the torch path's signature and
    unused; `tiles` = (BLOCK_N, BLOCK_V, BLOCK_H, num_warps) fixes the tile shape (else autotuned on a GPU).
    Without `tiles`, an N too small to fill the GPU runs the chunked cuBLAS path (module docstring).
    `logit_scale` and `softcap` transform the logits before T, as in `chunked.linear_token_logprobs`.
    """
    if _use_chunked_path(hidden, tiles):
        return chunked.linear_token_logprobs(
            hidden, weight, targets, temperature, chunk_tokens or DEFAULT_CHUNK_TOKENS, logit_scale=logit_scale,
            softcap=softcap,
        )
    hidden, weight, targets = _prepare(hidden, weight, targets, temperature, chunk_tokens)
    transform = check_transform(logit_scale, softcap)
    return _LinearTokenLogprobs.apply(hidden, weight, targets, float(temperature), tiles, transform)


class _LinearOPDLoss(torch.autograd.Function):
    """Forward: lse pass, then dH and dW kernels with the per-row gradient; backward only scales."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_lp, rollout_lp, opts, need_dh, need_dw):
        kl_coef, log_ratio_cap, normalizer, temperature, importance_ratio, tiles, transform = opts
        tiles = tile_kwargs(tiles)
        logit_args = _logit_args(temperature, transform)
        normalizer = normalizer_rows(normalizer, hidden.shape[0], hidden.device)
        opd = (teacher_lp, rollout_lp, normalizer, kl_coef, log_ratio_cap, importance_ratio)
        student_lp, lse, rest, loss_rows, grad = _forward(hidden, weight, targets, logit_args, tiles, opd)
        dhidden = dweight = None
        if need_dh or need_dw:
            dhidden, dweight = _grads(hidden, weight, targets, lse, rest, grad, logit_args, tiles, need_dh, need_dw)
        ctx.save_for_backward(dhidden, dweight)
        ctx.mark_non_differentiable(student_lp)
        return loss_rows.sum(), student_lp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_student_lp):
        dhidden, dweight = ctx.saved_tensors
        scale = scale_grad
        return scale(dhidden, grad_loss), scale(dweight, grad_loss), None, None, None, None, None, None


def linear_opd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    tiles: tuple[int, int, int, int] | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunked.linear_opd_loss` in Triton: (loss fp32 scalar, student_lp fp32 [N] detached).

    dH and dW are computed in forward, only for inputs that need grad; backward scales them. Small N on a GPU
    runs the chunked cuBLAS path unless `tiles` is given, as in `linear_token_logprobs`.
    """
    if _use_chunked_path(hidden, tiles):
        return chunked.linear_opd_loss(
            hidden, weight, targets, teacher_lp, rollout_lp, kl_coef=kl_coef, log_ratio_cap=log_ratio_cap,
            normalizer=normalizer, temperature=temperature, importance_ratio=importance_ratio,
            chunk_tokens=chunk_tokens or DEFAULT_CHUNK_TOKENS, logit_scale=logit_scale, softcap=softcap,
        )
    hidden, weight, targets = _prepare(hidden, weight, targets, temperature, chunk_tokens)
    n = hidden.shape[0]
    check_opd(n, teacher_lp, rollout_lp, normalizer)
    transform = check_transform(logit_scale, softcap)
    opts = (
        float(kl_coef), float(log_ratio_cap), normalizer, float(temperature), bool(importance_ratio), tiles, transform
    )
    need_dh = torch.is_grad_enabled() and hidden.requires_grad
    need_dw = torch.is_grad_enabled() and weight.requires_grad
    return _LinearOPDLoss.apply(
        hidden, weight, targets, teacher_lp.detach().float().contiguous(), rollout_lp.detach().float().contiguous(),
        opts, need_dh, need_dw,
    )

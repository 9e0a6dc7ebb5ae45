"""Triton reverse KL(student || teacher) per token from student and teacher logits [N, V], for the ablations.

Math, per row with x = z / T (fp32): one pass keeps online log-sum-exps of x_s and x_t (running max from
-inf) and the rescaled sum of exp(x_s - m_s) * (x_s - x_t), so KL = E_{p_s}[x_s - x_t] - (lse_s - lse_t).
The top-k form splits the vocab into the student's support S = {j : z_s(j) >= k-th largest z_s} and one tail
bucket, whose masses are summed directly over the complement (never 1 - sum over S, which cancels):
KL_k = sum_{j in S} p_s log(p_s / p_t) + tail_s log(tail_s / tail_t). Gradient, S held fixed:
d KL / d z_s(j) = p_s(j) (ell_j - KL) / T, ell_j = log p_s(j) - log p_t(j) on S, log(tail_s / tail_t) off it;
at the student's argmax it is written as minus the sum of the row's other entries (the gradient of a
shift-invariant function sums to 0), since p_s (ell - KL) cancels there when p_s -> 1.
Memory traffic: forward reads both logits once (writes fp32 [N] stats); backward reads student logits
once, teacher logits only on S (masked loads: about k sectors a row in top-k mode), writes dlogits once.
The top-k threshold comes from torch.topk over row chunks. Grids are 1-D over rows, row offsets int64.
Each side's logits may be transformed before T, x = softcap(scale z) / T (`common.transform`, constexpr flags
per side); the student's gradient then carries scale and its cap's slope, the argmax entry included. The
support stays {z_s >= threshold} on the raw logits: both transforms are increasing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.common import check_k, check_kl_args, check_transform, topk_threshold
from kernels.triton.common import DEFAULT_BLOCK_V, check_dtype, rowwise, softcap_slope, transform, transform_args

TOPK_CHUNK_ROWS = 4096  # rows per torch.topk call: bounds its [rows, k] values and workspace


@triton.jit
def _rkl_fwd_kernel(
    s_ptr, s_stride, t_ptr, t_stride, thr_ptr, kl_ptr, lse_s_ptr, lse_t_ptr, ltail_ptr, argmax_ptr, V, inv_temp,
    cap_in, cap_out, t_inv_temp, t_cap_in, t_cap_out,
    TOPK: tl.constexpr, SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    cols = tl.arange(0, BLOCK_V)
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    z_s = tl.zeros((), tl.float32)  # sum exp(x_s - m_s)
    z_t = tl.zeros((), tl.float32)  # sum exp(x_t - m_t)
    a_in = tl.zeros((), tl.float32)  # sum over S of exp(x_s - m_s) (x_s - x_t)
    e_in = tl.zeros((), tl.float32)  # sum over S of exp(x_s - m_s)
    tail_s = tl.zeros((), tl.float32)
    tail_t = tl.zeros((), tl.float32)
    top = tl.zeros((), tl.int32)  # argmax of x_s
    if TOPK:
        thr = tl.load(thr_ptr + row).to(tl.float32)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        valid = c < V
        zs = tl.load(s_row + c, mask=valid, other=float("-inf")).to(tl.float32)
        xs = transform(zs, inv_temp, cap_in, cap_out, SOFTCAP)
        xt = transform(
            tl.load(t_row + c, mask=valid, other=float("-inf")).to(tl.float32), t_inv_temp, t_cap_in, t_cap_out,
            T_SOFTCAP,
        )
        if SOFTCAP:
            xs = tl.where(valid, xs, float("-inf"))
        if T_SOFTCAP:
            xt = tl.where(valid, xt, float("-inf"))
        if TOPK:
            support = valid & (zs >= thr)
        else:
            support = valid
        block_max, block_arg = tl.max(xs, axis=0, return_indices=True)
        top = tl.where(block_max > m_s, v0 + block_arg, top)
        ms_new = tl.maximum(m_s, block_max)
        ms_safe = tl.where(ms_new == float("-inf"), 0.0, ms_new)  # no -inf - -inf
        alpha_s = tl.exp(m_s - ms_safe)
        es = tl.exp(xs - ms_safe)
        mt_new = tl.maximum(m_t, tl.max(xt, axis=0))
        mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
        alpha_t = tl.exp(m_t - mt_safe)
        et = tl.exp(xt - mt_safe)
        # 0 * log 0 := 0: no student mass, no contribution, even against a -inf teacher logit.
        weighted = tl.where(support & (es > 0), es * (xs - xt), 0.0)
        z_s = z_s * alpha_s + tl.sum(es, axis=0)
        z_t = z_t * alpha_t + tl.sum(et, axis=0)
        a_in = a_in * alpha_s + tl.sum(weighted, axis=0)
        if TOPK:
            e_in = e_in * alpha_s + tl.sum(tl.where(support, es, 0.0), axis=0)
            tail_s = tail_s * alpha_s + tl.sum(tl.where(support, 0.0, es), axis=0)
            tail_t = tail_t * alpha_t + tl.sum(tl.where(support, 0.0, et), axis=0)
        m_s = ms_new
        m_t = mt_new
    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)
    if TOPK:
        # With S = the whole vocab, e_in == z_s bit for bit (same sums) and the tail is empty: this is the
        # full-KL expression below, to the last bit.
        kl = a_in / z_s - (lse_s - lse_t) * (e_in / z_s)
        log_tail_ratio = (tl.log(tail_s) - tl.log(z_s)) - (tl.log(tail_t) - tl.log(z_t))
        kl += tl.where(tail_s > 0, (tail_s / z_s) * log_tail_ratio, 0.0)
        tl.store(ltail_ptr + row, log_tail_ratio)
    else:
        kl = a_in / z_s - (lse_s - lse_t)
    tl.store(kl_ptr + row, kl)
    tl.store(argmax_ptr + row, top)
    tl.store(lse_s_ptr + row, lse_s)
    tl.store(lse_t_ptr + row, lse_t)


@triton.jit
def _rkl_bwd_kernel(
    s_ptr, s_stride, t_ptr, t_stride, ds_ptr, ds_stride, thr_ptr, grad_ptr, kl_ptr, lse_s_ptr, lse_t_ptr, ltail_ptr,
    argmax_ptr, V, inv_temp, cap_in, cap_out, t_inv_temp, t_cap_in, t_cap_out,
    TOPK: tl.constexpr, SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    ds_row = ds_ptr + row * ds_stride
    scale = tl.load(grad_ptr + row) * inv_temp
    kl = tl.load(kl_ptr + row)
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    if TOPK:
        thr = tl.load(thr_ptr + row).to(tl.float32)
        log_tail_ratio = tl.load(ltail_ptr + row)
    top = tl.load(argmax_ptr + row)
    others = tl.zeros((), tl.float32)
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        valid = c < V
        zs = tl.load(s_row + c, mask=valid, other=float("-inf")).to(tl.float32)
        if TOPK:
            support = valid & (zs >= thr)
        else:
            support = valid
        # Off the support the teacher logit is not needed: the masked load skips those sectors.
        zt = tl.load(t_row + c, mask=support, other=0.0).to(tl.float32)
        xt = transform(zt, t_inv_temp, t_cap_in, t_cap_out, T_SOFTCAP)
        xs = transform(zs, inv_temp, cap_in, cap_out, SOFTCAP)
        if SOFTCAP:
            xs = tl.where(valid, xs, float("-inf"))
        log_ps = xs - lse_s
        ps = tl.exp(log_ps)
        ell = log_ps - (xt - lse_t)
        if TOPK:
            ell = tl.where(support, ell, log_tail_ratio)
        d = tl.where((ps > 0) & (c != top), ps * (ell - kl), 0.0) * scale
        others += tl.sum(d, axis=0)  # in x_s: the row sums to 0 there, before the slope
        if SOFTCAP:
            d = d * softcap_slope(zs, cap_in)
        tl.store(ds_row + c, d.to(ds_ptr.dtype.element_ty), mask=valid & (c != top))
    d_top = -others
    if SOFTCAP:
        d_top = d_top * softcap_slope(tl.load(s_row + top).to(tl.float32), cap_in)
    tl.store(ds_row + top, d_top.to(ds_ptr.dtype.element_ty))


def _block(v: int, block_v: int | None) -> tuple[int, int]:
    block = triton.next_power_of_2(int(block_v) if block_v else min(v, DEFAULT_BLOCK_V))
    return block, max(1, min(8, block // 256))


class _ReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, k, temperature, block_v, transforms):
        n, v = student_logits.shape
        device = student_logits.device
        topk = k is not None
        thr = topk_threshold(student_logits, k, TOPK_CHUNK_ROWS) if topk else None
        kl, lse_s, lse_t = (torch.empty(n, dtype=torch.float32, device=device) for _ in range(3))
        ltail = torch.empty(n, dtype=torch.float32, device=device) if topk else kl
        argmax = torch.empty(n, dtype=torch.int32, device=device)
        block, warps = _block(v, block_v)
        student, teacher = transforms
        args = (*transform_args(temperature, *student), *transform_args(temperature, *teacher))
        flags = dict(SOFTCAP=student[1] is not None, T_SOFTCAP=teacher[1] is not None)
        if n:
            _rkl_fwd_kernel[(n,)](
                student_logits, student_logits.stride(0), teacher_logits, teacher_logits.stride(0),
                thr if topk else kl, kl, lse_s, lse_t, ltail, argmax, v, *args,
                TOPK=topk, **flags, BLOCK_V=block, num_warps=warps,
            )
        ctx.save_for_backward(student_logits, teacher_logits, thr, kl, lse_s, lse_t, ltail if topk else None, argmax)
        ctx.topk, ctx.args, ctx.flags, ctx.block, ctx.warps = topk, args, flags, block, warps
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        student_logits, teacher_logits, thr, kl, lse_s, lse_t, ltail, argmax = ctx.saved_tensors
        n, v = student_logits.shape
        grad_kl = grad_kl.float().contiguous()
        dlogits = torch.empty_like(student_logits, memory_format=torch.contiguous_format)
        if n:
            _rkl_bwd_kernel[(n,)](
                student_logits, student_logits.stride(0), teacher_logits, teacher_logits.stride(0),
                dlogits, dlogits.stride(0), thr if ctx.topk else kl, grad_kl, kl, lse_s, lse_t,
                ltail if ctx.topk else kl, argmax, v, *ctx.args,
                TOPK=ctx.topk, **ctx.flags, BLOCK_V=ctx.block, num_warps=ctx.warps,
            )
        return dlogits, None, None, None, None, None


def _prepare(student_logits, teacher_logits, temperature, chunk_tokens):
    check_kl_args(student_logits, teacher_logits, temperature, chunk_tokens or 1)
    check_dtype(student_logits, "reverse KL")
    check_dtype(teacher_logits, "reverse KL")
    return rowwise(student_logits), rowwise(teacher_logits.detach())


def _transforms(
    *, logit_scale: float = 1.0, softcap: float | None = None, teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
) -> tuple[tuple[float, float | None], tuple[float, float | None]]:
    """Each side's (scale, cap), checked; the keywords of `kernels.torch_ops.divergence.logit_maps`."""
    return check_transform(logit_scale, softcap), check_transform(teacher_logit_scale, teacher_softcap, "teacher_")


def full_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    block_v: int | None = None,
    **transforms,
) -> torch.Tensor:
    """KL(p_s || p_t) per token over the full vocab -> fp32 [N]; differentiable in student_logits.

    Same math and logit transforms as `kernels.torch_ops.divergence.full_reverse_kl`; the teacher is frozen
    (detached). `chunk_tokens` is unused.
    """
    student_logits, teacher_logits = _prepare(student_logits, teacher_logits, temperature, chunk_tokens)
    transforms = _transforms(**transforms)
    return _ReverseKL.apply(student_logits, teacher_logits, None, float(temperature), block_v, transforms)


def topk_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    block_v: int | None = None,
    **transforms,
) -> torch.Tensor:
    """Reverse KL on the student's top-k support plus one tail bucket -> fp32 [N]; see `kernels.torch_ops`."""
    student_logits, teacher_logits = _prepare(student_logits, teacher_logits, temperature, chunk_tokens)
    check_k(k, student_logits.shape[1])
    transforms = _transforms(**transforms)
    return _ReverseKL.apply(student_logits, teacher_logits, int(k), float(temperature), block_v, transforms)

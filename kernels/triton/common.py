"""What the Triton ops share: row math called from their kernels, and the launch-side checks and layouts.

Grids are 1-D over rows or row blocks (CUDA caps grid y at 65535) and row offsets are int64 (N * V passes 2^31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRET = triton.knobs.runtime.interpret
# Vocab block of the logits kernels when a row does not fit in one; the interpreter, which is slow, gets small blocks.
DEFAULT_BLOCK_V = 128 if INTERPRET else 4096


@triton.jit
def online_lse_update(m, s, s_rest, x, is_target, axis: tl.constexpr):
    """One block of an online log-sum-exp: running max m, sum s of exp(x - m), and s_rest, the sum without y.

    A max of -inf (a block, or a row so far, of -inf logits) is replaced by 0 before subtracting, so
    exp(-inf - -inf) = NaN never appears; exp(-inf - 0) = 0 adds nothing.
    """
    m_new = tl.maximum(m, tl.max(x, axis=axis))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    if axis == 0:
        e = tl.exp(x - m_safe)
    else:
        e = tl.exp(x - m_safe[:, None])
    s = s * alpha + tl.sum(e, axis=axis)
    s_rest = s_rest * alpha + tl.sum(tl.where(is_target, 0.0, e), axis=axis)
    return m_new, s, s_rest


@triton.jit
def tanh(u):
    """tanh in fp32 to a few ulp (neither tl.math nor the interpreter has one). The odd series below |u| = 1/8,
    where (1 - e) / (1 + e) would lose the relative precision of 1 - e; its first dropped term is below 1e-11."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.125, series, (1.0 - e) / (1.0 + e))
    return tl.where(u < 0, -t, t)


@triton.jit
def transform(z, inv_temp, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """x = softcap(scale z) / T of fp32 logits z: z * inv_temp (inv_temp = scale / T) without a cap, else
    tanh(z * cap_in) * cap_out (cap_in = scale / cap, cap_out = cap / T). A cap maps -inf to a finite value:
    callers mask padding lanes after it."""
    if SOFTCAP:
        return tanh(z * cap_in) * cap_out
    return z * inv_temp


@triton.jit
def softcap_slope(z, cap_in):
    """sech^2(z * cap_in), the cap's d tanh(u) / du, as 4e / (1 + e)^2 with e = exp(-2|u|): 1 - tanh^2
    cancels in fp32 once tanh rounds near 1. 0 at z = +-inf."""
    e = tl.exp(-2.0 * tl.abs(z * cap_in))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


def transform_args(temperature: float, logit_scale: float, softcap: float | None) -> tuple[float, float, float]:
    """(inv_temp, cap_in, cap_out) for `transform`; inv_temp = scale / T is also d x / d z without the cap's slope.
    The cap's two are unused (0.0) without a cap."""
    inv_temp = logit_scale / temperature
    if softcap is None:
        return inv_temp, 0.0, 0.0
    return inv_temp, logit_scale / softcap, softcap / temperature


@triton.jit
def opd_row(student_lp, teacher_lp, rollout_lp, kl_coef, log_ratio_cap, normalizer, IMPORTANCE_RATIO: tl.constexpr):
    """(loss contribution, d loss / d student_lp) of tokens; the same math as `kernels.torch_ops.common.opd_chunk`."""
    advantage = kl_coef * (teacher_lp - rollout_lp)
    if IMPORTANCE_RATIO:
        log_ratio = student_lp - rollout_lp
        ratio = tl.exp(tl.minimum(log_ratio, log_ratio_cap))
        # Above the cap the ratio is a constant, so those tokens carry no gradient.
        grad = tl.where(log_ratio < log_ratio_cap, -(advantage / normalizer) * ratio, 0.0)
        loss = -(ratio * advantage) / normalizer
    else:
        grad = -advantage / normalizer
        loss = grad
    return loss, grad


@triton.jit
def guard_target(lp, target, V):
    """NaN where the target is outside [0, V): such an id selects no column, so the row would otherwise read
    -lse. Targets from the host are checked there first (`kernels.common.check_targets`); no device assert
    here, since one kills the CUDA context."""
    return tl.where((target >= 0) & (target < V), lp, float("nan"))


@triton.jit
def to_dot(x, UPCAST: tl.constexpr):
    # The Triton 3.9 interpreter multiplies bf16 tiles as their raw uint16 bits; fp32 operands give the
    # same result as the GPU's bf16 MMA (products of bf16 values are exact in fp32, sums in fp32).
    if UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def logits_tile(
    h_ptr, stride_hn, w_ptr, stride_wv, rows, cols, N, V, H, inv_temp, cap_in, cap_out,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """(x, slope): x = softcap(scale z) / T of z = H[rows] @ W[cols]^T in fp32 [BLOCK_N, BLOCK_V], columns past
    V -inf (`transform`); slope = the cap's `softcap_slope` under SOFTCAP, else x itself (unused)."""
    ks = tl.arange(0, BLOCK_H)
    row_ok = rows < N
    col_ok = cols < V
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k0 in range(0, H, BLOCK_H):
        k = k0 + ks
        k_ok = k < H
        h = tl.load(h_ptr + rows[:, None] * stride_hn + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * stride_wv + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(to_dot(h, UPCAST), to_dot(wt, UPCAST), acc, input_precision=PRECISION)
    x = tl.where(col_ok[None, :], transform(acc, inv_temp, cap_in, cap_out, SOFTCAP), float("-inf"))
    if SOFTCAP:
        return x, softcap_slope(acc, cap_in)
    return x, x


@triton.jit
def dlogits_tile(
    x, slope, is_target, lse, rest, scale, dtype: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr
):
    """scale * (onehot - softmax), target entry scale * rest, times the cap's slope under SOFTCAP, cast to the
    operand dtype of the next matmul."""
    p = tl.exp(x - lse[:, None])
    d = tl.where(is_target, (scale * rest)[:, None], -scale[:, None] * p)
    if SOFTCAP:
        d = d * slope
    return to_dot(d.to(dtype), UPCAST)


def check_dtype(x: torch.Tensor, what: str) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton {what} takes fp32/bf16/fp16, got {x.dtype}; use backend='torch' for fp64")


def normalizer_rows(normalizer, n: int, device: torch.device) -> torch.Tensor:
    """fp32 [N] divisors on device: the step-wide count broadcast with stride 0, or per-token divisors."""
    normalizer = torch.as_tensor(normalizer, dtype=torch.float32, device=device)
    return normalizer.reshape(1).expand(n) if normalizer.dim() == 0 else normalizer.contiguous()


def rowwise(x: torch.Tensor) -> torch.Tensor:
    # Rows may be strided (a slice of a bigger buffer); the vocab axis must be contiguous.
    return x if x.stride(-1) == 1 else x.contiguous()

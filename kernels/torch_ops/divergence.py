"""Chunked torch reverse KL(student || teacher) per token from student and teacher logits [N, V], for the ablations.

Forward, per row with x = z / T and p = softmax(x): KL = sum_j p_s(j) (log p_s(j) - log p_t(j)).
Top-k form: the student's support S = {j : z_s(j) >= k-th largest z_s} (`kernels.common.topk_threshold`)
plus one tail bucket, KL_k = sum_{j in S} p_s log(p_s / p_t) + tail_s log(tail_s / tail_t), tail masses
summed over the complement of S.
Gradient, S held fixed: d KL / d z_s(j) = p_s(j) (ell_j - KL) / T with ell_j = log p_s(j) - log p_t(j) on S and
log(tail_s / tail_t) off it (the tail is one bucket whose mass moves with z_s); the argmax entry is minus the
sum of the others (`kernels.torch_ops.common.chunk_reverse_kl`). The teacher is frozen.
Each side's logits may be transformed before T, x = softcap(scale z) / T (`LogitMap`); the student's gradient
then carries scale and the cap's slope. The top-k support is taken on the raw student logits: both transforms
are increasing, so it is the same set.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels.common import DEFAULT_CHUNK_TOKENS, check_k, check_kl_args, check_transform, topk_threshold
from kernels.torch_ops.common import LogitMap, acc_dtype, chunk_reverse_kl


class _ReverseKL(torch.autograd.Function):
    """Reads both logits once forward and once backward (recomputing both softmaxes); saves the top-k threshold."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, k, maps, chunk_tokens):
        student_map, teacher_map = maps
        acc = acc_dtype(student_logits.dtype)
        n = student_logits.shape[0]
        thr = None if k is None else topk_threshold(student_logits, k, chunk_tokens)
        kl = torch.empty(n, dtype=acc, device=student_logits.device)
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            support = None if thr is None else student_logits[s:e] >= thr[s:e, None]
            logp_s = student_map.log_softmax(student_logits[s:e], acc)
            xt = teacher_map.apply(teacher_logits[s:e], acc)
            kl[s:e] = chunk_reverse_kl(logp_s, xt, support)[0]
        ctx.save_for_backward(student_logits, teacher_logits, thr)
        ctx.maps, ctx.chunk_tokens = maps, chunk_tokens
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        student_logits, teacher_logits, thr = ctx.saved_tensors
        (student_map, teacher_map), chunk_tokens = ctx.maps, ctx.chunk_tokens
        acc = acc_dtype(student_logits.dtype)
        grad_kl = grad_kl.to(acc)
        dlogits = torch.empty_like(student_logits)
        for s in range(0, student_logits.shape[0], chunk_tokens):
            e = min(s + chunk_tokens, student_logits.shape[0])
            support = None if thr is None else student_logits[s:e] >= thr[s:e, None]
            logp_s = student_map.log_softmax(student_logits[s:e], acc)
            xt = teacher_map.apply(teacher_logits[s:e], acc)
            dkl = chunk_reverse_kl(logp_s, xt, support)[1]
            dkl.mul_((grad_kl[s:e] / student_map.divisor)[:, None])
            dlogits[s:e] = student_map.slope_(dkl, student_logits[s:e])
        return dlogits, None, None, None, None


def full_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    **transforms,
) -> torch.Tensor:
    """KL(p_s || p_t) per token over the full vocab -> fp32 [N] (fp64 for fp64), p = softmax(logits / T).

    Differentiable in student_logits: d KL / d z_s = p_s * (log p_s - log p_t - KL) / T. The teacher is
    frozen: its logits are detached. `transforms`: `logit_maps`.
    """
    check_kl_args(student_logits, teacher_logits, temperature, chunk_tokens)
    maps = logit_maps(temperature, **transforms)
    return _ReverseKL.apply(student_logits, teacher_logits.detach(), None, maps, int(chunk_tokens))


def topk_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    **transforms,
) -> torch.Tensor:
    """Reverse KL on the student's top-k support S plus one tail bucket -> fp32 [N], differentiable in student_logits.

    KL_k = sum_{j in S} p_s(j) log(p_s(j) / p_t(j)) + tail_s log(tail_s / tail_t), tail = mass outside S on
    each side; S = {j : z_s(j) >= k-th largest z_s} (see `topk_threshold`) is held fixed when differentiating.
    With k = V the tail is empty and KL_k is the full reverse KL. `transforms`: `logit_maps`.
    """
    check_kl_args(student_logits, teacher_logits, temperature, chunk_tokens)
    check_k(k, student_logits.shape[1])
    maps = logit_maps(temperature, **transforms)
    return _ReverseKL.apply(student_logits, teacher_logits.detach(), int(k), maps, int(chunk_tokens))


def logit_maps(
    temperature: float,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
) -> tuple[LogitMap, LogitMap]:
    """(student map, teacher map), both at T: each side's logits are softcap(scale * z) / T,
    softcap(u) = cap * tanh(u / cap)."""
    return (
        LogitMap(float(temperature), *check_transform(logit_scale, softcap)),
        LogitMap(float(temperature), *check_transform(teacher_logit_scale, teacher_softcap, "teacher_")),
    )

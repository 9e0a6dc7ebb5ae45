"""Chunked torch token log-probs and the sampled-token OPD loss on logits [N, V] (docs/design.md, "The step", 5-6).

Forward, per row with x = softcap(scale * logits) / T (`LogitMap`; plain logits / T by default) and target y:
lse = log sum_j exp(x_j), lp = x_y - lse.
Gradient: d lp / d x = onehot(y) - softmax(x), whose target entry sum_{j != y} p_j is summed over the other
classes, never written 1 - p_y (that cancels to 0 in fp32 once p_y -> 1); d x / d logits = scale / T, times
the cap's slope sech^2(scale * logits / cap).
OPD loss: A = kl_coef (teacher_lp - rollout_lp), r = exp(min(lp - rollout_lp, cap)),
loss = -sum(r A) / normalizer, so d loss / d lp = -r A / normalizer below the cap and 0 above it; the
REINFORCE form (importance_ratio=False) has d loss / d lp = -A / normalizer. The chain rule through lp gives
d loss / d logits, written during forward; backward only scales it (`kernels.common.scale_grad`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels.common import (
    DEFAULT_CHUNK_TOKENS, check_common, check_logits, check_opd, check_targets, check_transform, scale_grad,
)
from kernels.torch_ops.common import (
    LogitMap, acc_dtype, chunk_dlogits, chunk_logprobs, chunk_rows, normalizer_tensor, opd_chunk,
)


class _TokenLogprobs(torch.autograd.Function):
    """Reads logits once forward, once backward (recomputing softmax); saves only lse [N] fp32."""

    @staticmethod
    def forward(ctx, logits, targets, logit_map, chunk_tokens):
        acc = acc_dtype(logits.dtype)
        n = logits.shape[0]
        student_lp = torch.empty(n, dtype=acc, device=logits.device)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            x = logit_map.apply(logits[s:e], acc)
            student_lp[s:e], lse[s:e] = chunk_logprobs(x, targets[s:e])
        ctx.save_for_backward(logits, targets, lse)
        ctx.logit_map, ctx.chunk_tokens = logit_map, chunk_tokens
        return student_lp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp):
        logits, targets, lse = ctx.saved_tensors
        logit_map, chunk_tokens = ctx.logit_map, ctx.chunk_tokens
        acc = lse.dtype
        grad_lp = grad_lp.to(acc)
        dlogits = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk_tokens):
            e = min(s + chunk_tokens, logits.shape[0])
            x = logit_map.apply(logits[s:e], acc)
            dx = chunk_dlogits(x, lse[s:e], targets[s:e], grad_lp[s:e], logit_map.divisor)
            dlogits[s:e] = logit_map.slope_(dx, logits[s:e])
        return dlogits, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """log_softmax(logits / T)[i, targets[i]] -> fp32 [N] (fp64 for fp64 logits); differentiable in logits.

    With `logit_scale` and `softcap`, the logits scored are softcap(logit_scale * logits) before the division
    by T, softcap(u) = cap * tanh(u / cap) (`LogitMap`).
    """
    check_logits(logits)
    check_common(logits.shape[0], targets, temperature, chunk_tokens)
    logit_map = LogitMap(float(temperature), *check_transform(logit_scale, softcap))
    targets = check_targets(targets, logits.shape[1], logits.device)
    return _TokenLogprobs.apply(logits, targets, logit_map, int(chunk_tokens))


class _OPDLoss(torch.autograd.Function):
    """Reads logits once and writes dlogits once (in logits' dtype), both in forward; backward only scales."""

    @staticmethod
    def forward(ctx, logits, targets, teacher_lp, rollout_lp, opts, need_grad):
        kl_coef, log_ratio_cap, normalizer, logit_map, importance_ratio, chunk_tokens = opts
        acc = acc_dtype(logits.dtype)
        n = logits.shape[0]
        normalizer = normalizer_tensor(normalizer, acc, logits.device)
        teacher_lp, rollout_lp = teacher_lp.to(acc), rollout_lp.to(acc)
        student_lp = torch.empty(n, dtype=acc, device=logits.device)
        loss = torch.zeros((), dtype=acc, device=logits.device)
        dlogits = torch.empty_like(logits) if need_grad else None
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            x = logit_map.apply(logits[s:e], acc)
            lp, lse = chunk_logprobs(x, targets[s:e])
            student_lp[s:e] = lp
            loss_c, grad_lp = opd_chunk(
                lp, teacher_lp[s:e], rollout_lp[s:e], kl_coef, log_ratio_cap, chunk_rows(normalizer, s, e),
                importance_ratio,
            )
            loss += loss_c
            if need_grad:
                dx = chunk_dlogits(x, lse, targets[s:e], grad_lp, logit_map.divisor)
                dlogits[s:e] = logit_map.slope_(dx, logits[s:e])
        # save_for_backward, not a ctx attribute: autograd then frees the buffer right after backward.
        ctx.save_for_backward(dlogits)
        ctx.mark_non_differentiable(student_lp)
        return loss, student_lp

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
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token OPD loss on student logits [N, V] -> (loss fp32 scalar, student_lp fp32 [N], no grad).

    A = kl_coef * (teacher_lp - rollout_lp); loss = -sum(exp(min(student_lp - rollout_lp, cap)) * A) / normalizer,
    or with importance_ratio=False the REINFORCE form (value -sum(A)/normalizer, gradient of -sum(A*student_lp)).
    `normalizer` counts active tokens over the whole step (all micro-batches and ranks), not N; a [N] tensor
    instead divides each token by its own count (per-sequence normalisation: sequence length x sequences).
    The gradient is computed during forward; backward only scales it (see `kernels.common.scale_grad`).
    `logit_scale` and `softcap` transform the logits before T, as in `token_logprobs`.
    """
    check_logits(logits)
    n = logits.shape[0]
    check_common(n, targets, temperature, chunk_tokens)
    check_opd(n, teacher_lp, rollout_lp, normalizer)
    logit_map = LogitMap(float(temperature), *check_transform(logit_scale, softcap))
    targets = check_targets(targets, logits.shape[1], logits.device)
    opts = (float(kl_coef), float(log_ratio_cap), normalizer, logit_map, bool(importance_ratio), int(chunk_tokens))
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    return _OPDLoss.apply(logits, targets, teacher_lp.detach(), rollout_lp.detach(), opts, need_grad)

"""Chunked torch full-vocabulary divergences between student and teacher from both sides' hidden states.

Per chunk of C rows both sides' logits are rebuilt: x_s = (H_c W^T) / T, x_t = H'_c W'^T (the teacher at
T = 1), p = softmax(x); [N, V] logits never exist. Each side may have its own logit scale and cap,
x = softcap(scale z) / T (`LogitMap`); the student's gradient then carries scale and the cap's slope.
Divergences D per row and their gradients in x_s:
  full_rkl  KL(p_s || p_t) = sum p_s (log p_s - log p_t);     dD/dx_s = p_s (ell - D), ell = log p_s - log p_t
  topk_rkl  the same on the student's top-k (ties kept) plus one tail bucket (`kernels.torch_ops.divergence`)
  fkl       KL(p_t || p_s) = sum p_t (log p_t - log p_s);     dD/dx_s = p_s - p_t
  jsd       beta KL(p_t || M) + (1 - beta) KL(p_s || M), M = beta p_t + (1 - beta) p_s;
            dD/dx_s = (1 - beta) p_s (ell - KL(p_s || M)), ell = log p_s - log M (M's own terms cancel).
loss = scale * sum_t D_t / normalizer_t; then with G = d loss / d x_s / T, dH_c = G W and dW = sum G^T H_c
(fp32 sum), computed in forward; backward only scales them. Chunked torch on every device: each chunk is
two matmuls and a few [C, V] elementwise passes, so the matmuls dominate and run in cuBLAS on a GPU, where
half-precision inputs give fp32 logits (`wide_product`).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from kernels.common import (
    DEFAULT_CHUNK_TOKENS, check_common, check_linear, check_normalizer, check_targets, check_transform, scale_grad,
)
from kernels.torch_ops.common import (
    LogitMap, acc_dtype, at_targets, chunk_reverse_kl, chunk_rows, linear_chunks, normalizer_tensor, wide_product,
)

DIVERGENCES = ("full_rkl", "topk_rkl", "fkl", "jsd")


def _chunk_forward_kl(logp_s: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(p_t || p_s) [C], its gradient in xs [C, V]) = (sum p_t (log p_t - log p_s), p_s - p_t)."""
    logp_t = torch.log_softmax(xt, dim=-1, dtype=logp_s.dtype)
    p_t = torch.exp(logp_t)
    kl = torch.where(p_t > 0, p_t * (logp_t - logp_s), 0.0).sum(dim=-1)
    return kl, torch.exp(logp_s).sub_(p_t)


def _chunk_jsd(logp_s: torch.Tensor, xt: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised JSD and its gradient in xs, with M = beta p_t + (1 - beta) p_s:

    JSD_beta = beta KL(p_t || M) + (1 - beta) KL(p_s || M). The terms from M's own dependence on p_s
    cancel, leaving d JSD / d xs = (1 - beta) p_s (ell - KL(p_s || M)), ell = log p_s - log M.
    """
    logp_t = torch.log_softmax(xt, dim=-1, dtype=logp_s.dtype)
    log_m = torch.logaddexp(logp_t + math.log(beta), logp_s + math.log1p(-beta))
    p_s, p_t = torch.exp(logp_s), torch.exp(logp_t)
    ell = logp_s - log_m
    kl_s = torch.where(p_s > 0, p_s * ell, 0.0).sum(dim=-1)
    kl_t = torch.where(p_t > 0, p_t * (logp_t - log_m), 0.0).sum(dim=-1)
    grad = torch.where(p_s > 0, (1.0 - beta) * p_s * (ell - kl_s[:, None]), 0.0)
    return beta * kl_t + (1.0 - beta) * kl_s, grad


def _chunk_divergence(
    objective: str, logits: torch.Tensor, logit_map: LogitMap, logp_s: torch.Tensor, xt: torch.Tensor, k: int,
    beta: float,
):
    """(divergence [C], its gradient in the student's transformed logits x_s [C, V]) for one chunk: `logits`
    the student's raw chunk logits, logp_s the log_softmax of x_s = logit_map(logits), xt the teacher's
    logits in any float dtype."""
    if objective == "full_rkl":
        kl, grad, _ = chunk_reverse_kl(logp_s, xt, None)
        return kl, grad
    if objective == "topk_rkl":
        # The support from the scaled logits themselves, as the tail-bucket op (`divergence.topk_reverse_kl`)
        # defines it. Under a transform, from the raw ones: a cap saturates in fp32, and its ties would let in
        # every token tied at the k-th value; both transforms are increasing, so in exact arithmetic the set is
        # the same.
        xs = logit_map.apply(logits, logp_s.dtype) if logit_map.plain else logits
        threshold = torch.topk(xs, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        kl, grad, _ = chunk_reverse_kl(logp_s, xt, xs >= threshold)
        return kl, grad
    if objective == "fkl":
        return _chunk_forward_kl(logp_s, xt)
    return _chunk_jsd(logp_s, xt, beta)


def _check_divergence(objective, hidden, weight, teacher_hidden, teacher_weight, k, beta) -> None:
    if objective not in DIVERGENCES:
        raise ValueError(f"objective must be one of {DIVERGENCES}, got {objective!r}")
    check_linear(hidden, weight)
    check_linear(teacher_hidden, teacher_weight)
    if teacher_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} rows but hidden has {hidden.shape[0]}")
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher vocab {teacher_weight.shape[0]} != student vocab {weight.shape[0]}")
    if objective == "topk_rkl" and not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k must be in [1, V={weight.shape[0]}], got {k}")
    if objective == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1) (its limits are fkl and full_rkl up to scale), got {beta}")


class _LinearDivergenceLoss(torch.autograd.Function):
    """Per chunk: both sides' logits from hidden states, the divergence, dH_c and the fp32 dW sum, all in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, opts, need_dh, need_dw):
        objective, k, beta, scale, normalizer, logit_map, teacher_map, chunk_tokens = opts
        acc = acc_dtype(hidden.dtype)
        n = hidden.shape[0]
        normalizer = normalizer_tensor(normalizer, acc, hidden.device)
        student_lp = torch.empty(n, dtype=acc, device=hidden.device)
        divergence = torch.empty(n, dtype=acc, device=hidden.device)

        def dlogits_of_chunk(s, e, logits):
            logp_s = logit_map.log_softmax(logits, acc)
            student_lp[s:e] = at_targets(logp_s, targets[s:e])
            # The teacher at T = 1, the student at the sampling temperature: the distributions that
            # sampled_rkl compares one sampled token at a time.
            xt = wide_product(teacher_hidden[s:e], teacher_weight.T)
            if not teacher_map.plain:
                xt = teacher_map.apply(xt, acc)
            value, grad = _chunk_divergence(objective, logits, logit_map, logp_s, xt, k, beta)
            divergence[s:e] = value
            grad.mul_((scale / chunk_rows(normalizer, s, e) / logit_map.divisor).reshape(-1, 1))
            return logit_map.slope_(grad, logits)

        dhidden, dweight = linear_chunks(hidden, weight, chunk_tokens, dlogits_of_chunk, need_dh, need_dw)
        loss = (scale * divergence / normalizer).sum()
        ctx.save_for_backward(dhidden, dweight)
        ctx.mark_non_differentiable(student_lp, divergence)
        return loss, student_lp, divergence

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_student_lp, _grad_divergence):
        dhidden, dweight = ctx.saved_tensors
        return scale_grad(dhidden, grad_loss), scale_grad(dweight, grad_loss), None, None, None, None, None, None


def linear_divergence_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    objective: str,
    normalizer: float | torch.Tensor,
    scale: float = 1.0,
    k: int = 64,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A full-vocabulary divergence between student and teacher, per active token, on hidden states.

    -> (loss = scale * sum(D_t / normalizer_t), student_lp [N] of `targets`, D [N]), fp32; neither side's
    [N, V] logits exist at once: each chunk rebuilds both from hidden [N, H] @ weight[V, H]^T and
    teacher_hidden [N, H'] @ teacher_weight[V, H']^T. Student logits are divided by `temperature`,
    the teacher's are not. D is one of
      full_rkl  KL(p_s || p_t);
      topk_rkl  the same on the student's top-k tokens (ties kept) plus one tail bucket;
      fkl       KL(p_t || p_s);
      jsd       beta KL(p_t || M) + (1 - beta) KL(p_s || M), M = beta p_t + (1 - beta) p_s.
    The teacher is frozen; dH and dW are computed in forward (as in `linear_opd_loss`).
    Each side's logits may be transformed before T, softcap(logit_scale * z) with softcap(u) = cap * tanh(u / cap):
    the student's by `logit_scale` and `softcap`, the teacher's (another model, maybe another architecture) by
    `teacher_logit_scale` and `teacher_softcap`. Under a student transform, topk_rkl takes the top k of the
    untransformed student logits (the same tokens, without the ties a saturated cap makes).
    """
    _check_divergence(objective, hidden, weight, teacher_hidden, teacher_weight, int(k), float(beta))
    n = hidden.shape[0]
    check_common(n, targets, temperature, chunk_tokens)
    check_normalizer(n, normalizer)
    logit_map = LogitMap(float(temperature), *check_transform(logit_scale, softcap))
    teacher_map = LogitMap(1.0, *check_transform(teacher_logit_scale, teacher_softcap, "teacher_"))
    targets = check_targets(targets, weight.shape[0], hidden.device)
    opts = (objective, int(k), float(beta), float(scale), normalizer, logit_map, teacher_map, int(chunk_tokens))
    need_dh = torch.is_grad_enabled() and hidden.requires_grad
    need_dw = torch.is_grad_enabled() and weight.requires_grad
    return _LinearDivergenceLoss.apply(
        hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), targets, opts, need_dh, need_dw
    )

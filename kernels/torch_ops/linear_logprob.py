"""Chunked torch token log-probs and OPD loss on hidden [N, H] and lm_head weight [V, H] (docs/design.md,
"The step", 5).

Forward, per chunk of C rows: x = (H_c W^T) / T [C, V] (`wide_product`: fp32 on CUDA, else the input dtype;
softmax math in fp32; with a logit scale or cap, x = softcap(scale H_c W^T) / T, `LogitMap`),
lp = log_softmax(x)[y] in one fused pass, lse = x[y] - lp. [N, V] logits never exist: only [C, V] at a time.
Gradient: with G = d loss / d (H_c W^T) (g (onehot - softmax) / T, g = d loss / d lp, `dlogits_from_probs`;
times scale and the cap's slope under a transform),
dH_c = G W and dW = sum over chunks of G^T H_c, that sum kept in fp32 (bf16 accumulation drifts).
token log-probs save lse and recompute each chunk's logits in backward; the OPD loss computes dH and dW
in forward, only for inputs that need grad, and backward scales them.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels.common import (
    DEFAULT_CHUNK_TOKENS, check_common, check_linear, check_opd, check_targets, check_transform, scale_grad,
)
from kernels.torch_ops.common import (
    LogitMap, acc_dtype, at_targets, chunk_rows, dlogits_from_probs, linear_chunks, normalizer_tensor, opd_chunk,
    wide_product,
)


def _linear_grads(hidden, weight, targets, lse, grad_fn, logit_map, chunk_tokens, need_dh, need_dw):
    """dH and dW of a loss on token log-probs; `grad_fn(s, e, lp)` returns d loss / d student_lp for a
    chunk, given its log-probs (None when `lse` is given: the saved log-sum-exp of a backward pass)."""
    acc = acc_dtype(hidden.dtype)

    def dlogits_of_chunk(s, e, logits):
        if lse is None:
            logp = logit_map.log_softmax(logits, acc)
            grad_lp = grad_fn(s, e, at_targets(logp, targets[s:e]))
            probs = logp.exp_()
        else:
            grad_lp = grad_fn(s, e, None)
            probs = logit_map.apply(logits, acc).sub_(lse[s:e, None]).exp_()  # logits is ours to overwrite
        # Under a cap `apply` wrote a new buffer, so `logits` still holds z for the slope.
        return logit_map.slope_(dlogits_from_probs(probs, targets[s:e], grad_lp, logit_map.divisor), logits)

    return linear_chunks(hidden, weight, chunk_tokens, dlogits_of_chunk, need_dh, need_dw)


def _chunk_logprobs(logits, targets, logit_map, acc):
    """(target log-prob [C], log-sum-exp [C]) of one chunk's untransformed logits, from one log-softmax pass."""
    lp = at_targets(logit_map.log_softmax(logits, acc), targets)
    target_logit = logit_map.apply(at_targets(logits, targets), acc)
    return lp, target_logit - lp


class _LinearTokenLogprobs(torch.autograd.Function):
    """Forward: one [C, H] x [H, V] matmul per chunk; saves lse [N] fp32, never the [N, V] logits.

    Backward recomputes each chunk's logits, then dH_c = dlogits @ W and dW += dlogits^T @ H_c,
    with dW accumulated in fp32 across chunks (bf16 accumulation drifts).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, logit_map, chunk_tokens):
        acc = acc_dtype(hidden.dtype)
        n = hidden.shape[0]
        student_lp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            logits = wide_product(hidden[s:e], weight.T)
            student_lp[s:e], lse[s:e] = _chunk_logprobs(logits, targets[s:e], logit_map, acc)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.logit_map, ctx.chunk_tokens = logit_map, chunk_tokens
        return student_lp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_lp = grad_lp.to(lse.dtype)

        def grad_student_lp(s, e, _lp):
            return grad_lp[s:e]

        dhidden, dweight = _linear_grads(
            hidden, weight, targets, lse, grad_student_lp, ctx.logit_map, ctx.chunk_tokens, need_dh, need_dw
        )
        return dhidden, dweight, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """log_softmax(hidden @ weight.T / T)[i, targets[i]] -> fp32 [N], never materialising [N, V].

    Differentiable in hidden and weight; the matmuls run in the input dtype (with fp32 logits on CUDA), softmax
    math in fp32. With `logit_scale` and `softcap` the logits are softcap(logit_scale * hidden @ weight.T)
    before the division by T, softcap(u) = cap * tanh(u / cap) (`LogitMap`).
    """
    check_linear(hidden, weight)
    check_common(hidden.shape[0], targets, temperature, chunk_tokens)
    logit_map = LogitMap(float(temperature), *check_transform(logit_scale, softcap))
    targets = check_targets(targets, weight.shape[0], hidden.device)
    return _LinearTokenLogprobs.apply(hidden, weight, targets, logit_map, int(chunk_tokens))


class _LinearOPDLoss(torch.autograd.Function):
    """Per chunk: logits = H_c @ W^T, then dH_c and the fp32 dW sum, all in forward; backward only scales."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_lp, rollout_lp, opts, need_dh, need_dw):
        kl_coef, log_ratio_cap, normalizer, logit_map, importance_ratio, chunk_tokens = opts
        acc = acc_dtype(hidden.dtype)
        n = hidden.shape[0]
        normalizer = normalizer_tensor(normalizer, acc, hidden.device)
        teacher_lp, rollout_lp = teacher_lp.to(acc), rollout_lp.to(acc)
        student_lp = torch.empty(n, dtype=acc, device=hidden.device)
        loss = torch.zeros((), dtype=acc, device=hidden.device)

        def grad_student_lp(s, e, lp):
            nonlocal loss
            student_lp[s:e] = lp
            loss_c, grad_lp = opd_chunk(
                lp, teacher_lp[s:e], rollout_lp[s:e], kl_coef, log_ratio_cap, chunk_rows(normalizer, s, e),
                importance_ratio,
            )
            loss += loss_c
            return grad_lp

        if need_dh or need_dw:
            dhidden, dweight = _linear_grads(
                hidden, weight, targets, None, grad_student_lp, logit_map, chunk_tokens, need_dh, need_dw
            )
        else:
            dhidden = dweight = None
            for s in range(0, n, chunk_tokens):
                e = min(s + chunk_tokens, n)
                logp = logit_map.log_softmax(wide_product(hidden[s:e], weight.T), acc)
                grad_student_lp(s, e, at_targets(logp, targets[s:e]))
        ctx.save_for_backward(dhidden, dweight)
        ctx.mark_non_differentiable(student_lp)
        return loss, student_lp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_student_lp):
        dhidden, dweight = ctx.saved_tensors
        return scale_grad(dhidden, grad_loss), scale_grad(dweight, grad_loss), None, None, None, None, None, None


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
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`opd_loss` on hidden [N, H] and lm_head weight [V, H], never materialising [N, V].

    dH [N, H] and dW [V, H] (fp32-accumulated) are computed in forward, only for inputs that need grad.
    `logit_scale` and `softcap` transform the logits before T, as in `linear_token_logprobs`.
    """
    check_linear(hidden, weight)
    n = hidden.shape[0]
    check_common(n, targets, temperature, chunk_tokens)
    check_opd(n, teacher_lp, rollout_lp, normalizer)
    logit_map = LogitMap(float(temperature), *check_transform(logit_scale, softcap))
    targets = check_targets(targets, weight.shape[0], hidden.device)
    opts = (float(kl_coef), float(log_ratio_cap), normalizer, logit_map, bool(importance_ratio), int(chunk_tokens))
    need_dh = torch.is_grad_enabled() and hidden.requires_grad
    need_dw = torch.is_grad_enabled() and weight.requires_grad
    return _LinearOPDLoss.apply(
        hidden, weight, targets, teacher_lp.detach(), rollout_lp.detach(), opts, need_dh, need_dw
    )

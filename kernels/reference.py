"""Chunked pure-torch token log-probs and the fused OPD loss: the CPU path and the tests' oracle.

Inputs are packed over active tokens ([N, ...], N up to millions). Every op walks N in chunks of
`chunk_tokens`, so the only fp32 [*, V] buffers are [chunk, V]; softmax math runs in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_TOKENS = 1024


# ---------------------------------------------------------------------------------------------
# Shared chunk math
# ---------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp64 inputs keep fp64 so that gradcheck and the float64 oracle tests are exact.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(logits: torch.Tensor, temperature: float, acc: torch.dtype) -> torch.Tensor:
    """logits / T in the accumulation dtype. May alias `logits`: callers never write into it."""
    x = logits.to(acc)
    return x / temperature if temperature != 1.0 else x


def _chunk_logprobs(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-prob and log-sum-exp of one [C, V] chunk of scaled logits."""
    lse = torch.logsumexp(x, dim=-1)  # [C]
    return x.gather(1, targets[:, None]).squeeze(1) - lse, lse


def _chunk_dlogits(
    x: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, grad_lp: torch.Tensor, temperature: float
) -> torch.Tensor:
    """d(sum_t g_t * logp_t(y_t)) / d logits for one chunk: g * (onehot - softmax) / T, in x's dtype.

    The target column is rebuilt as g * sum_{j != y} p_j rather than g * (1 - p_y): when p(y) -> 1,
    1 - p_y cancels to 0 in fp32 while the sum of the other probabilities keeps full relative precision.
    """
    targets = targets[:, None]
    probs = torch.exp(x - lse[:, None])  # [C, V]
    probs.scatter_(1, targets, 0.0)
    rest = probs.sum(dim=-1)  # = 1 - p(y)
    scale = grad_lp / temperature
    probs.mul_(-scale[:, None])
    probs.scatter_(1, targets, (scale * rest)[:, None])
    return probs


def _opd_chunk(
    student_lp: torch.Tensor,
    teacher_lp: torch.Tensor,
    rollout_lp: torch.Tensor,
    kl_coef: float,
    log_ratio_cap: float,
    normalizer: torch.Tensor,  # 0-d, or the chunk's per-token divisors
    importance_ratio: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss contribution of one chunk and d loss / d student_lp (docs/design.md, "The loss and its gradient")."""
    advantage = kl_coef * (teacher_lp - rollout_lp)  # A_t, detached by construction
    if not importance_ratio:
        # REINFORCE form -sum(A * student_lp)/N: its value is reported with ratio = 1.
        return (-advantage / normalizer).sum(), -advantage / normalizer
    log_ratio = student_lp - rollout_lp
    ratio = torch.exp(torch.clamp(log_ratio, max=log_ratio_cap))
    # Above the cap the ratio is a constant, so those tokens carry no gradient.
    grad_student_lp = -(advantage / normalizer) * ratio * (log_ratio < log_ratio_cap)
    return (-(ratio * advantage) / normalizer).sum(), grad_student_lp


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_common(n: int, targets: torch.Tensor, temperature: float, chunk_tokens: int) -> None:
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must have shape [N]=[{n}], got {list(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


def _check_targets(targets: torch.Tensor, v: int, device: torch.device) -> torch.Tensor:
    """Targets range-checked on the host, then on `device` (copied there if they were on the host).

    An id outside [0, V) must not reach the device: there torch's gather, or an assert, fails as a device-side
    assert that loses its message and kills the CUDA context. Targets are packed on the host, so the check
    costs no device sync; targets already on a GPU are passed through unchecked (a check would sync), and
    the Triton kernels give such rows a NaN log-prob rather than a value.
    """
    if targets.device.type == "cpu":
        if targets.numel():
            lo, hi = (int(t) for t in torch.aminmax(targets))
            if lo < 0 or hi >= v:
                bad = targets[(targets < 0) | (targets >= v)]
                raise ValueError(
                    f"targets must lie in [0, V={v}); got {bad.numel()} outside it, e.g. {bad[:3].tolist()} "
                    "(a tokenizer larger than the model's vocabulary?)"
                )
        return targets.to(device, non_blocking=True) if device.type != "cpu" else targets
    return targets


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be packed as [N, V], got shape {list(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def _check_linear(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be packed as [N, H], got shape {list(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {list(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden is [N, {hidden.shape[1]}] but weight is [V, {weight.shape[1]}]: H differs")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise ValueError(f"hidden and weight must share one float dtype, got {hidden.dtype} and {weight.dtype}")


def _check_opd(n: int, teacher_lp: torch.Tensor, rollout_lp: torch.Tensor, normalizer) -> None:
    for name, lp in (("teacher_lp", teacher_lp), ("rollout_lp", rollout_lp)):
        if lp.dim() != 1 or lp.shape[0] != n:
            raise ValueError(f"{name} must have shape [N]=[{n}], got {list(lp.shape)}")
    _check_normalizer(n, normalizer)


def _check_normalizer(n: int, normalizer) -> None:
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 and list(normalizer.shape) != [n]:
            raise ValueError(
                f"normalizer must be a float, a 0-d tensor or per-token divisors [N]=[{n}], got shape {list(normalizer.shape)}"
            )
    elif not normalizer > 0:
        raise ValueError(f"normalizer (active tokens over the whole step) must be > 0, got {normalizer}")


def _as_tensor(normalizer, acc: torch.dtype, device: torch.device) -> torch.Tensor:
    # A 0-d tensor stays on device: no host sync per micro-batch.
    return torch.as_tensor(normalizer, dtype=acc, device=device)


def _rows(normalizer: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """The chunk's divisors: the one step-wide count, or per-token divisors (per-sequence normalisation)."""
    return normalizer if normalizer.dim() == 0 else normalizer[s:e]


# ---------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------


class _TokenLogprobs(torch.autograd.Function):
    """Reads logits once forward, once backward (recomputing softmax); saves only lse [N] fp32."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk_tokens):
        acc = _acc_dtype(logits.dtype)
        n = logits.shape[0]
        student_lp = torch.empty(n, dtype=acc, device=logits.device)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            x = _scaled(logits[s:e], temperature, acc)
            student_lp[s:e], lse[s:e] = _chunk_logprobs(x, targets[s:e])
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        return student_lp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp):
        logits, targets, lse = ctx.saved_tensors
        temperature, chunk_tokens = ctx.temperature, ctx.chunk_tokens
        acc = lse.dtype
        grad_lp = grad_lp.to(acc)
        dlogits = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk_tokens):
            e = min(s + chunk_tokens, logits.shape[0])
            x = _scaled(logits[s:e], temperature, acc)
            dlogits[s:e] = _chunk_dlogits(x, lse[s:e], targets[s:e], grad_lp[s:e], temperature)
        return dlogits, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """log_softmax(logits / T)[i, targets[i]] -> fp32 [N] (fp64 for fp64 logits); differentiable in logits."""
    _check_logits(logits)
    _check_common(logits.shape[0], targets, temperature, chunk_tokens)
    targets = _check_targets(targets, logits.shape[1], logits.device)
    return _TokenLogprobs.apply(logits, targets, float(temperature), int(chunk_tokens))


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs
# ---------------------------------------------------------------------------------------------


class _LinearTokenLogprobs(torch.autograd.Function):
    """Forward: one [C, H] x [H, V] matmul per chunk; saves lse [N] fp32, never the [N, V] logits.

    Backward recomputes each chunk's logits, then dH_c = dlogits @ W and dW += dlogits^T @ H_c,
    with dW accumulated in fp32 across chunks (bf16 accumulation drifts).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_tokens):
        acc = _acc_dtype(hidden.dtype)
        n = hidden.shape[0]
        student_lp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            x = _scaled(hidden[s:e] @ weight.T, temperature, acc)  # [C, V]
            student_lp[s:e], lse[s:e] = _chunk_logprobs(x, targets[s:e])
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        return student_lp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_lp = grad_lp.to(lse.dtype)

        def grad_student_lp(s, e, _x, _lse):
            return grad_lp[s:e]

        dhidden, dweight = _linear_grads(
            hidden, weight, targets, lse, grad_student_lp, ctx.temperature, ctx.chunk_tokens, need_dh, need_dw
        )
        return dhidden, dweight, None, None, None


def _linear_grads(hidden, weight, targets, lse, grad_fn, temperature, chunk_tokens, need_dh, need_dw):
    """dH and dW of a loss on token log-probs; `grad_fn(s, e, x, lse)` gets a chunk's scaled logits and
    log-sum-exp (recomputed when `lse` is None) and returns d loss / d student_lp for it."""

    def dlogits_of_chunk(s, e, x):
        lse_c = torch.logsumexp(x, dim=-1) if lse is None else lse[s:e]
        return _chunk_dlogits(x, lse_c, targets[s:e], grad_fn(s, e, x, lse_c), temperature)

    return _linear_chunks(hidden, weight, temperature, chunk_tokens, dlogits_of_chunk, need_dh, need_dw)


def _linear_chunks(hidden, weight, temperature, chunk_tokens, dlogits_fn, need_dh, need_dw):
    """Walk N in chunks: x = (H_c @ W^T) / T, dlogits = dlogits_fn(s, e, x), then dH_c = dlogits @ W and
    dW += dlogits^T @ H_c. Returns dH [N, H] (hidden dtype) and dW [V, H] (summed in fp32, cast to the
    weight dtype), None where not needed; dlogits_fn runs for every chunk either way."""
    acc = _acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    dhidden = torch.empty_like(hidden) if need_dh else None
    dweight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
    for s in range(0, n, chunk_tokens):
        e = min(s + chunk_tokens, n)
        hidden_c = hidden[s:e]
        x = _scaled(hidden_c @ weight.T, temperature, acc)  # [C, V]
        dlogits = dlogits_fn(s, e, x).to(hidden.dtype)
        del x
        if need_dh:
            dhidden[s:e] = dlogits @ weight
        if need_dw:
            if dlogits.dtype == acc:
                dweight.addmm_(dlogits.T, hidden_c)
            else:
                dweight += dlogits.T @ hidden_c  # matmul in bf16, sum across chunks in fp32
    if need_dw:
        dweight = dweight.to(weight.dtype)
    return dhidden, dweight


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """log_softmax(hidden @ weight.T / T)[i, targets[i]] -> fp32 [N], never materialising [N, V].

    Differentiable in hidden and weight; the matmuls run in the input dtype, softmax math in fp32.
    """
    _check_linear(hidden, weight)
    _check_common(hidden.shape[0], targets, temperature, chunk_tokens)
    targets = _check_targets(targets, weight.shape[0], hidden.device)
    return _LinearTokenLogprobs.apply(hidden, weight, targets, float(temperature), int(chunk_tokens))


# ---------------------------------------------------------------------------------------------
# opd_loss / linear_opd_loss: gradient computed inside the forward
# ---------------------------------------------------------------------------------------------


def _scale_grad(grad: torch.Tensor | None, grad_loss: torch.Tensor) -> torch.Tensor | None:
    """Scale a gradient precomputed in forward by d(outer)/d(loss).

    The usual outer scale is 1 (the normaliser already covers the whole step), and then the saved
    buffer is returned as is. Otherwise it is scaled in place, so no second [N, *] buffer is made;
    autograd's version check then refuses a second backward through the same graph instead of
    returning a doubly scaled gradient.
    """
    if grad is None:
        return None
    if bool(grad_loss != 1):
        grad.mul_(grad_loss)
    return grad


class _OPDLoss(torch.autograd.Function):
    """Reads logits once and writes dlogits once (in logits' dtype), both in forward; backward only scales."""

    @staticmethod
    def forward(ctx, logits, targets, teacher_lp, rollout_lp, opts, need_grad):
        kl_coef, log_ratio_cap, normalizer, temperature, importance_ratio, chunk_tokens = opts
        acc = _acc_dtype(logits.dtype)
        n = logits.shape[0]
        normalizer = _as_tensor(normalizer, acc, logits.device)
        teacher_lp, rollout_lp = teacher_lp.to(acc), rollout_lp.to(acc)
        student_lp = torch.empty(n, dtype=acc, device=logits.device)
        loss = torch.zeros((), dtype=acc, device=logits.device)
        dlogits = torch.empty_like(logits) if need_grad else None
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            x = _scaled(logits[s:e], temperature, acc)
            lp, lse = _chunk_logprobs(x, targets[s:e])
            student_lp[s:e] = lp
            loss_c, grad_lp = _opd_chunk(
                lp, teacher_lp[s:e], rollout_lp[s:e], kl_coef, log_ratio_cap, _rows(normalizer, s, e), importance_ratio
            )
            loss += loss_c
            if need_grad:
                dlogits[s:e] = _chunk_dlogits(x, lse, targets[s:e], grad_lp, temperature)
        # save_for_backward, not a ctx attribute: autograd then frees the buffer right after backward.
        ctx.save_for_backward(dlogits)
        ctx.mark_non_differentiable(student_lp)
        return loss, student_lp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_student_lp):
        (dlogits,) = ctx.saved_tensors
        return _scale_grad(dlogits, grad_loss), None, None, None, None, None


class _LinearOPDLoss(torch.autograd.Function):
    """Per chunk: logits = H_c @ W^T, then dH_c and the fp32 dW sum, all in forward; backward only scales."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_lp, rollout_lp, opts, need_dh, need_dw):
        kl_coef, log_ratio_cap, normalizer, temperature, importance_ratio, chunk_tokens = opts
        acc = _acc_dtype(hidden.dtype)
        n = hidden.shape[0]
        normalizer = _as_tensor(normalizer, acc, hidden.device)
        teacher_lp, rollout_lp = teacher_lp.to(acc), rollout_lp.to(acc)
        student_lp = torch.empty(n, dtype=acc, device=hidden.device)
        loss = torch.zeros((), dtype=acc, device=hidden.device)

        def grad_student_lp(s, e, x, lse):
            nonlocal loss
            lp = x.gather(1, targets[s:e, None]).squeeze(1) - lse
            student_lp[s:e] = lp
            loss_c, grad_lp = _opd_chunk(
                lp, teacher_lp[s:e], rollout_lp[s:e], kl_coef, log_ratio_cap, _rows(normalizer, s, e), importance_ratio
            )
            loss += loss_c
            return grad_lp

        if need_dh or need_dw:
            dhidden, dweight = _linear_grads(
                hidden, weight, targets, None, grad_student_lp, temperature, chunk_tokens, need_dh, need_dw
            )
        else:
            dhidden = dweight = None
            for s in range(0, n, chunk_tokens):
                e = min(s + chunk_tokens, n)
                x = _scaled(hidden[s:e] @ weight.T, temperature, acc)
                grad_student_lp(s, e, x, torch.logsumexp(x, dim=-1))
        ctx.save_for_backward(dhidden, dweight)
        ctx.mark_non_differentiable(student_lp)
        return loss, student_lp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_student_lp):
        dhidden, dweight = ctx.saved_tensors
        return _scale_grad(dhidden, grad_loss), _scale_grad(dweight, grad_loss), None, None, None, None, None, None


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token OPD loss on student logits [N, V] -> (loss fp32 scalar, student_lp fp32 [N], no grad).

    A = kl_coef * (teacher_lp - rollout_lp); loss = -sum(exp(min(student_lp - rollout_lp, cap)) * A) / normalizer,
    or with importance_ratio=False the REINFORCE form (value -sum(A)/normalizer, gradient of -sum(A*student_lp)).
    `normalizer` counts active tokens over the whole step (all micro-batches and ranks), not N; a [N] tensor
    instead divides each token by its own count (per-sequence normalisation: sequence length x sequences).
    The gradient is computed during forward; backward only scales it (see `_scale_grad`).
    """
    _check_logits(logits)
    n = logits.shape[0]
    _check_common(n, targets, temperature, chunk_tokens)
    _check_opd(n, teacher_lp, rollout_lp, normalizer)
    targets = _check_targets(targets, logits.shape[1], logits.device)
    opts = (
        float(kl_coef), float(log_ratio_cap), normalizer, float(temperature), bool(importance_ratio), int(chunk_tokens)
    )
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    return _OPDLoss.apply(logits, targets, teacher_lp.detach(), rollout_lp.detach(), opts, need_grad)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """`opd_loss` on hidden [N, H] and lm_head weight [V, H], never materialising [N, V].

    dH [N, H] and dW [V, H] (fp32-accumulated) are computed in forward, only for inputs that need grad.
    """
    _check_linear(hidden, weight)
    n = hidden.shape[0]
    _check_common(n, targets, temperature, chunk_tokens)
    _check_opd(n, teacher_lp, rollout_lp, normalizer)
    targets = _check_targets(targets, weight.shape[0], hidden.device)
    opts = (
        float(kl_coef), float(log_ratio_cap), normalizer, float(temperature), bool(importance_ratio), int(chunk_tokens)
    )
    need_dh = torch.is_grad_enabled() and hidden.requires_grad
    need_dw = torch.is_grad_enabled() and weight.requires_grad
    return _LinearOPDLoss.apply(
        hidden, weight, targets, teacher_lp.detach(), rollout_lp.detach(), opts, need_dh, need_dw
    )


# ---------------------------------------------------------------------------------------------
# full_reverse_kl / topk_reverse_kl: KL(student || teacher) against teacher logits, for the ablations
# ---------------------------------------------------------------------------------------------


def topk_threshold(student_logits: torch.Tensor, k: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """The k-th largest student logit per row, [N] in the logits dtype.

    The top-k support is {j : z_j >= threshold}: ties at the threshold are all kept, so it can hold more
    than k tokens (bf16 logits tie often); Triton and reference use this same definition.
    """
    n = student_logits.shape[0]
    thr = torch.empty(n, dtype=student_logits.dtype, device=student_logits.device)
    for s in range(0, n, chunk_tokens):
        e = min(s + chunk_tokens, n)
        thr[s:e] = torch.topk(student_logits[s:e], k, dim=-1, sorted=False).values.amin(dim=-1)
    return thr


def _chunk_reverse_kl(
    xs: torch.Tensor, xt: torch.Tensor, support: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(kl [C], p_s * (ell - kl) [C, V], log tail ratio [C] or None) for one chunk of scaled logits.

    ell_j = log p_s(j) - log p_t(j) on the support and log(tail_s / tail_t) outside it; then
    d KL / d x_s(j) = p_s(j) * (ell_j - KL) for both forms (the tail is one bucket whose mass moves with x_s).
    """
    logp_s = xs - torch.logsumexp(xs, dim=-1, keepdim=True)
    logp_t = xt - torch.logsumexp(xt, dim=-1, keepdim=True)
    p_s = torch.exp(logp_s)
    ell = logp_s - logp_t
    log_tail_ratio = None
    if support is not None:
        # Tail masses summed directly over the complement, never 1 - sum(top-k): that cancels when the
        # top-k holds almost all the mass, exactly where log(tail_s / tail_t) is most sensitive.
        log_tail_s = torch.logsumexp(logp_s.masked_fill(support, float("-inf")), dim=-1)
        log_tail_t = torch.logsumexp(logp_t.masked_fill(support, float("-inf")), dim=-1)
        log_tail_ratio = log_tail_s - log_tail_t
        ell = torch.where(support, ell, log_tail_ratio[:, None])
    # 0 * log 0 := 0: a token (or tail) the student gives no mass adds nothing, even against a -inf teacher.
    weighted = torch.where(p_s > 0, p_s * ell, 0.0)
    if support is None:
        kl = weighted.sum(dim=-1)
    else:
        kl = torch.where(support, weighted, 0.0).sum(dim=-1)
        kl = kl + torch.where(log_tail_s > float("-inf"), torch.exp(log_tail_s) * log_tail_ratio, 0.0)
    dkl = torch.where(p_s > 0, p_s * (ell - kl[:, None]), 0.0)
    # KL is unchanged by adding a constant to x_s, so the gradient sums to 0 over the row. At the argmax,
    # p_s * (ell - KL) cancels when p_s -> 1 (ell and KL both tend to 0 and fp32 rounds them to 0), so that
    # entry is rebuilt as minus the sum of the others, each accurate to fp32 relative precision.
    top = xs.argmax(dim=-1, keepdim=True)
    dkl.scatter_(1, top, 0.0)
    dkl.scatter_(1, top, -dkl.sum(dim=-1, keepdim=True))
    return kl, dkl, log_tail_ratio


class _ReverseKL(torch.autograd.Function):
    """Reads both logits once forward and once backward (recomputing both softmaxes); saves the top-k threshold."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, k, temperature, chunk_tokens):
        acc = _acc_dtype(student_logits.dtype)
        n = student_logits.shape[0]
        thr = None if k is None else topk_threshold(student_logits, k, chunk_tokens)
        kl = torch.empty(n, dtype=acc, device=student_logits.device)
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            support = None if thr is None else student_logits[s:e] >= thr[s:e, None]
            xs = _scaled(student_logits[s:e], temperature, acc)
            xt = _scaled(teacher_logits[s:e], temperature, acc)
            kl[s:e] = _chunk_reverse_kl(xs, xt, support)[0]
        ctx.save_for_backward(student_logits, teacher_logits, thr)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        student_logits, teacher_logits, thr = ctx.saved_tensors
        temperature, chunk_tokens = ctx.temperature, ctx.chunk_tokens
        acc = _acc_dtype(student_logits.dtype)
        grad_kl = grad_kl.to(acc)
        dlogits = torch.empty_like(student_logits)
        for s in range(0, student_logits.shape[0], chunk_tokens):
            e = min(s + chunk_tokens, student_logits.shape[0])
            support = None if thr is None else student_logits[s:e] >= thr[s:e, None]
            xs = _scaled(student_logits[s:e], temperature, acc)
            xt = _scaled(teacher_logits[s:e], temperature, acc)
            dkl = _chunk_reverse_kl(xs, xt, support)[1]
            dlogits[s:e] = dkl.mul_((grad_kl[s:e] / temperature)[:, None])
        return dlogits, None, None, None, None


def _check_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    _check_logits(student_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must match student_logits {list(student_logits.shape)}, got {list(teacher_logits.shape)}"
        )
    if not teacher_logits.is_floating_point():
        raise ValueError(f"teacher_logits must be floating point, got {teacher_logits.dtype}")


def _check_kl_args(student_logits, teacher_logits, temperature, chunk_tokens) -> None:
    _check_pair(student_logits, teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


def full_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """KL(p_s || p_t) per token over the full vocab -> fp32 [N] (fp64 for fp64), p = softmax(logits / T).

    Differentiable in student_logits: d KL / d z_s = p_s * (log p_s - log p_t - KL) / T. The teacher is
    frozen: its logits are detached.
    """
    _check_kl_args(student_logits, teacher_logits, temperature, chunk_tokens)
    return _ReverseKL.apply(student_logits, teacher_logits.detach(), None, float(temperature), int(chunk_tokens))


def topk_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Reverse KL on the student's top-k support S plus one tail bucket -> fp32 [N], differentiable in student_logits.

    KL_k = sum_{j in S} p_s(j) log(p_s(j) / p_t(j)) + tail_s log(tail_s / tail_t), tail = mass outside S on
    each side; S = {j : z_s(j) >= k-th largest z_s} (see `topk_threshold`) is held fixed when differentiating.
    With k = V the tail is empty and KL_k is the full reverse KL.
    """
    _check_kl_args(student_logits, teacher_logits, temperature, chunk_tokens)
    v = student_logits.shape[1]
    if not 1 <= int(k) <= v:
        raise ValueError(f"k must be in [1, V={v}], got {k}")
    return _ReverseKL.apply(student_logits, teacher_logits.detach(), int(k), float(temperature), int(chunk_tokens))


# ---------------------------------------------------------------------------------------------
# linear_divergence_loss: full-vocabulary objectives against the teacher's hidden states
# ---------------------------------------------------------------------------------------------

DIVERGENCES = ("full_rkl", "topk_rkl", "fkl", "jsd")


def _chunk_forward_kl(xs: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(p_t || p_s) [C], its gradient in xs [C, V]) = (sum p_t (log p_t - log p_s), p_s - p_t)."""
    logp_s = xs - torch.logsumexp(xs, dim=-1, keepdim=True)
    logp_t = xt - torch.logsumexp(xt, dim=-1, keepdim=True)
    p_t = torch.exp(logp_t)
    kl = torch.where(p_t > 0, p_t * (logp_t - logp_s), 0.0).sum(dim=-1)
    return kl, torch.exp(logp_s) - p_t


def _chunk_jsd(xs: torch.Tensor, xt: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised JSD and its gradient in xs, with M = beta p_t + (1 - beta) p_s:

    JSD_beta = beta KL(p_t || M) + (1 - beta) KL(p_s || M). The terms from M's own dependence on p_s
    cancel, leaving d JSD / d xs = (1 - beta) p_s (ell - KL(p_s || M)), ell = log p_s - log M.
    """
    logp_s = xs - torch.logsumexp(xs, dim=-1, keepdim=True)
    logp_t = xt - torch.logsumexp(xt, dim=-1, keepdim=True)
    log_m = torch.logaddexp(logp_t + math.log(beta), logp_s + math.log1p(-beta))
    p_s, p_t = torch.exp(logp_s), torch.exp(logp_t)
    ell = logp_s - log_m
    kl_s = torch.where(p_s > 0, p_s * ell, 0.0).sum(dim=-1)
    kl_t = torch.where(p_t > 0, p_t * (logp_t - log_m), 0.0).sum(dim=-1)
    grad = torch.where(p_s > 0, (1.0 - beta) * p_s * (ell - kl_s[:, None]), 0.0)
    return beta * kl_t + (1.0 - beta) * kl_s, grad


def _chunk_divergence(objective: str, xs: torch.Tensor, xt: torch.Tensor, k: int, beta: float):
    """(divergence [C], its gradient in the scaled student logits xs [C, V]) for one chunk."""
    if objective == "full_rkl":
        kl, grad, _ = _chunk_reverse_kl(xs, xt, None)
        return kl, grad
    if objective == "topk_rkl":
        threshold = torch.topk(xs, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        kl, grad, _ = _chunk_reverse_kl(xs, xt, xs >= threshold)
        return kl, grad
    if objective == "fkl":
        return _chunk_forward_kl(xs, xt)
    return _chunk_jsd(xs, xt, beta)


def _check_divergence(objective, hidden, weight, teacher_hidden, teacher_weight, k, beta) -> None:
    if objective not in DIVERGENCES:
        raise ValueError(f"objective must be one of {DIVERGENCES}, got {objective!r}")
    _check_linear(hidden, weight)
    _check_linear(teacher_hidden, teacher_weight)
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
        objective, k, beta, scale, normalizer, temperature, chunk_tokens = opts
        acc = _acc_dtype(hidden.dtype)
        n = hidden.shape[0]
        normalizer = _as_tensor(normalizer, acc, hidden.device)
        student_lp = torch.empty(n, dtype=acc, device=hidden.device)
        divergence = torch.empty(n, dtype=acc, device=hidden.device)

        def dlogits_of_chunk(s, e, xs):
            lse = torch.logsumexp(xs, dim=-1)
            student_lp[s:e] = xs.gather(1, targets[s:e, None]).squeeze(1) - lse
            # The teacher at T = 1, the student at the sampling temperature: the distributions that
            # sampled_rkl compares one sampled token at a time.
            xt = (teacher_hidden[s:e] @ teacher_weight.T).to(acc)
            value, grad = _chunk_divergence(objective, xs, xt, k, beta)
            divergence[s:e] = value
            return grad.mul_((scale / _rows(normalizer, s, e) / temperature).reshape(-1, 1))

        dhidden, dweight = _linear_chunks(
            hidden, weight, temperature, chunk_tokens, dlogits_of_chunk, need_dh, need_dw
        )
        loss = (scale * divergence / normalizer).sum()
        ctx.save_for_backward(dhidden, dweight)
        ctx.mark_non_differentiable(student_lp, divergence)
        return loss, student_lp, divergence

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_student_lp, _grad_divergence):
        dhidden, dweight = ctx.saved_tensors
        return _scale_grad(dhidden, grad_loss), _scale_grad(dweight, grad_loss), None, None, None, None, None, None


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
    """
    _check_divergence(objective, hidden, weight, teacher_hidden, teacher_weight, int(k), float(beta))
    n = hidden.shape[0]
    _check_common(n, targets, temperature, chunk_tokens)
    _check_normalizer(n, normalizer)
    targets = _check_targets(targets, weight.shape[0], hidden.device)
    opts = (objective, int(k), float(beta), float(scale), normalizer, float(temperature), int(chunk_tokens))
    need_dh = torch.is_grad_enabled() and hidden.requires_grad
    need_dw = torch.is_grad_enabled() and weight.requires_grad
    return _LinearDivergenceLoss.apply(
        hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), targets, opts, need_dh, need_dw
    )

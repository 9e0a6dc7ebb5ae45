"""Chunk math the chunked torch ops share: each op walks N in chunks of `chunk_tokens` rows, so the only
fp32 [*, V] buffers are [chunk, V]; softmax math runs in fp32 (fp64 for fp64 inputs)."""

from __future__ import annotations

from typing import NamedTuple

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp64 inputs keep fp64 so that gradcheck and the float64 oracle tests are exact.
    return torch.float64 if dtype == torch.float64 else torch.float32


# torch.mm(a, b, out_dtype=torch.float32) for bf16/fp16 inputs exists from torch 2.8, with kernels on CUDA only.
_MM_TAKES_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def wide_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D operands; on CUDA, bf16/fp16 operands give an fp32 result.

    cuBLAS accumulates in fp32 either way; keeping its result unrounded matters for logits: bf16
    moves a logit of 14 by up to 0.03, which is percents of a KL between two close distributions.
    A CPU has no such kernel, and there a bf16 result keeps the matmul on the AMX/AVX512-BF16 units.
    """
    if _MM_TAKES_OUT_DTYPE and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a @ b


def scaled(logits: torch.Tensor, temperature: float, acc: torch.dtype) -> torch.Tensor:
    """logits / T in the accumulation dtype. May alias `logits`: callers never write into it."""
    x = logits.to(acc)
    return x / temperature if temperature != 1.0 else x


class LogitMap(NamedTuple):
    """The logits an op scores, from z (hidden @ W^T, or the logits it is given): x = softcap(scale z) / T with
    softcap(u) = cap tanh(u / cap), the temperature last, as transformers has it (the model's forward transforms
    the logits, the sampler divides them). dx/dz = (scale / T) sech^2(scale z / cap). The plain map (scale 1,
    no cap) runs the same operations as an op without these options."""

    temperature: float = 1.0
    scale: float = 1.0
    softcap: float | None = None

    @property
    def plain(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    @property
    def divisor(self) -> float:
        """T / scale, the divisor that the gradient helpers take as their temperature (the cap's slope aside)."""
        return self.temperature if self.scale == 1.0 else self.temperature / self.scale

    def apply(self, z: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """x in `acc`. May alias z, as `scaled` may."""
        if self.softcap is None:
            if self.scale == 1.0:
                return scaled(z, self.temperature, acc)
            return z.to(acc) * (self.scale / self.temperature)
        return torch.tanh(z.to(acc) * (self.scale / self.softcap)).mul_(self.softcap / self.temperature)

    def log_softmax(self, z: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """log_softmax(x) in `acc`, a fresh buffer."""
        if self.plain:
            return chunk_log_softmax(z, self.temperature, acc)
        return torch.log_softmax(self.apply(z, acc), dim=-1)

    def slope_(self, dz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """dz times the cap's slope sech^2(scale z / cap), in place; dz as it is without a cap.

        dz is the gradient the helpers give with `divisor` as their temperature, (d/dx) scale / T. The slope
        is 4e / (1 + e)^2 with e = exp(-2 |u|): 1 - tanh(u)^2 cancels in fp32 once tanh(u) rounds near 1.
        """
        if self.softcap is None:
            return dz
        e = z.to(dz.dtype).abs().mul_(-2.0 * self.scale / self.softcap).exp_()
        dz.mul_(e).mul_(4.0)
        return dz.div_(e.add_(1.0).square_())


def normalizer_tensor(normalizer, acc: torch.dtype, device: torch.device) -> torch.Tensor:
    # A 0-d tensor stays on device: no host sync per micro-batch.
    return torch.as_tensor(normalizer, dtype=acc, device=device)


def chunk_rows(normalizer: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """The chunk's divisors: the one step-wide count, or per-token divisors (per-sequence normalisation)."""
    return normalizer if normalizer.dim() == 0 else normalizer[s:e]


def chunk_logprobs(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-prob and log-sum-exp of one [C, V] chunk of scaled logits."""
    lse = torch.logsumexp(x, dim=-1)  # [C]
    return at_targets(x, targets) - lse, lse


def at_targets(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's entry at its target column: [C, V], [C] -> [C]."""
    return x.gather(1, targets[:, None]).squeeze(1)


def chunk_log_softmax(logits: torch.Tensor, temperature: float, acc: torch.dtype) -> torch.Tensor:
    """log_softmax(logits / T) in `acc`, as a fresh [C, V] buffer. At T = 1 one fused pass reads the
    logits in their own dtype and writes `acc`, with no `acc` copy of the logits in between."""
    if temperature == 1.0:
        return torch.log_softmax(logits, dim=-1, dtype=acc)
    return torch.log_softmax(logits.to(acc) / temperature, dim=-1)


def chunk_dlogits(
    x: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, grad_lp: torch.Tensor, temperature: float
) -> torch.Tensor:
    """d(sum_t g_t * logp_t(y_t)) / d logits for one chunk: g * (onehot - softmax) / T, in x's dtype."""
    return dlogits_from_probs(torch.exp(x - lse[:, None]), targets, grad_lp, temperature)


def dlogits_from_probs(
    probs: torch.Tensor, targets: torch.Tensor, grad_lp: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`chunk_dlogits` from the chunk's softmax [C, V], written over `probs`.

    The target column is rebuilt as g * sum_{j != y} p_j rather than g * (1 - p_y): when p(y) -> 1,
    1 - p_y cancels to 0 in fp32 while the sum of the other probabilities keeps full relative precision.
    """
    targets = targets[:, None]
    probs.scatter_(1, targets, 0.0)
    rest = probs.sum(dim=-1)  # = 1 - p(y)
    scale = grad_lp / temperature
    probs.mul_(-scale[:, None])
    probs.scatter_(1, targets, (scale * rest)[:, None])
    return probs


def opd_chunk(
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


def chunk_reverse_kl(
    logp_s: torch.Tensor, xt: torch.Tensor, support: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(kl [C], p_s * (ell - kl) [C, V], log tail ratio [C] or None) for one chunk.

    `logp_s` is the student's log-softmax of its scaled logits x_s, in the accumulation dtype (from
    `chunk_log_softmax`: no copy of x_s is needed); xt, the teacher's scaled logits, may be in a lower
    precision: its log-softmax is taken in logp_s's dtype.
    ell_j = log p_s(j) - log p_t(j) on the support and log(tail_s / tail_t) outside it; then
    d KL / d x_s(j) = p_s(j) * (ell_j - KL) for both forms (the tail is one bucket whose mass moves with x_s).
    [C, V] buffers are reused in place: each is a few ms a pass.
    """
    logp_t = torch.log_softmax(xt, dim=-1, dtype=logp_s.dtype)
    p_s = torch.exp(logp_s)
    log_tail_ratio = None
    if support is not None:
        # Tail masses summed directly over the complement, never 1 - sum(top-k): that cancels when the
        # top-k holds almost all the mass, exactly where log(tail_s / tail_t) is most sensitive.
        log_tail_s = torch.logsumexp(logp_s.masked_fill(support, float("-inf")), dim=-1)
        log_tail_t = torch.logsumexp(logp_t.masked_fill(support, float("-inf")), dim=-1)
        log_tail_ratio = log_tail_s - log_tail_t
    ell = logp_t.neg_().add_(logp_s)  # log p_s - log p_t, in logp_t's buffer
    if support is not None:
        ell = torch.where(support, ell, log_tail_ratio[:, None])
    # 0 * log 0 := 0: a token (or tail) the student gives no mass adds nothing, even against a -inf teacher.
    dead = ~(p_s > 0)
    weighted = (p_s * ell).masked_fill_(dead, 0.0)
    if support is None:
        kl = weighted.sum(dim=-1)
    else:
        kl = weighted.masked_fill_(~support, 0.0).sum(dim=-1)
        kl = kl + torch.where(log_tail_s > float("-inf"), torch.exp(log_tail_s) * log_tail_ratio, 0.0)
    del weighted
    dkl = ell.sub_(kl[:, None]).mul_(p_s).masked_fill_(dead, 0.0)
    # KL is unchanged by adding a constant to x_s, so the gradient sums to 0 over the row. At the argmax,
    # p_s * (ell - KL) cancels when p_s -> 1 (ell and KL both tend to 0 and fp32 rounds them to 0), so that
    # entry is rebuilt as minus the sum of the others, each accurate to fp32 relative precision.
    top = logp_s.argmax(dim=-1, keepdim=True)
    dkl.scatter_(1, top, 0.0)
    dkl.scatter_(1, top, -dkl.sum(dim=-1, keepdim=True))
    return kl, dkl, log_tail_ratio


def linear_chunks(hidden, weight, chunk_tokens, dlogits_fn, need_dh, need_dw):
    """Walk N in chunks: logits = H_c @ W^T (`wide_product`: fp32 on CUDA, else the input dtype; unscaled,
    a buffer dlogits_fn may write over), dlogits = dlogits_fn(s, e, logits) (d loss / d logits), then
    dH_c = dlogits @ W and dW += dlogits^T @ H_c. Returns dH [N, H] (hidden dtype) and dW [V, H] (summed
    in fp32, cast to the weight dtype), None where not needed; dlogits_fn runs for every chunk either way."""
    acc = acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    dhidden = torch.empty_like(hidden) if need_dh else None
    dweight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
    for s in range(0, n, chunk_tokens):
        e = min(s + chunk_tokens, n)
        hidden_c = hidden[s:e]
        dlogits = dlogits_fn(s, e, wide_product(hidden_c, weight.T)).to(hidden.dtype)
        if need_dh:
            dhidden[s:e] = dlogits @ weight
        if need_dw:
            if dlogits.dtype == acc:
                dweight.addmm_(dlogits.T, hidden_c)
            else:
                dweight += wide_product(dlogits.T, hidden_c)  # each chunk's product in half precision on CPU; summed in fp32
    if need_dw:
        dweight = dweight.to(weight.dtype)
    return dhidden, dweight

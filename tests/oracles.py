"""Float64 references the kernel and objective tests compare against, written from the definitions, unchunked,
and the inputs the kernel tests draw (fresh random draws each run; the `random_seed` fixture replays one).
"""

from __future__ import annotations

import os

import torch

# Inputs live on the GPU when the Triton kernels run compiled there, else on the CPU, where TRITON_INTERPRET=1
# (set by conftest on machines without CUDA) runs them in numpy.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
V = 1001  # odd, so no chunk, block or tile divides it
V_SMALL = 509  # odd too: the interpreter is slow
TINY_TILES = (16, 32, 16, 1)  # BLOCK_N, BLOCK_V, BLOCK_H, num_warps: many blocks on every axis


# The fused linear log-prob's tolerances, (log-prob atol, gradient tolerance: atol per max |expected| and rtol),
# by backend and dtype. fp32: fp32 products and sums. bf16, Triton: inputs are exact, logits fp32-accumulated,
# dlogits rounded to bf16 before the gradient matmuls (like autograd's bf16 matmul) and dH/dW rounded to bf16 at
# the end. bf16, torch: the matmul itself returns bf16 logits, so log-probs carry bf16 rounding of logits of
# size ~1-10 (before a logit transform, which the kernels apply in fp32).
LINEAR_TOL = {
    ("torch", torch.float32): (2e-5, 2e-5),
    ("triton", torch.float32): (2e-5, 2e-5),
    ("torch", torch.bfloat16): (5e-2, 2e-2),
    ("triton", torch.bfloat16): (1e-4, 1.5e-2),
}


def backend_options(backend: str, chunk_tokens: int, **triton_options) -> dict:
    """Keyword arguments of a `kernels` call: the chunk for the torch path, block or tile overrides for Triton
    (which accepts `chunk_tokens` and ignores it)."""
    return dict(backend=backend, chunk_tokens=chunk_tokens, **(triton_options if backend == "triton" else {}))


def lp64(logits, targets, temperature=1.0):
    return torch.log_softmax(logits.double() / temperature, dim=-1).gather(1, targets[:, None]).squeeze(1)


def logits64(z, scale=1.0, softcap=None, temperature=1.0):
    """softcap(scale * z) / T in float64, softcap(u) = cap * tanh(u / cap): what the ops' logit transform must give."""
    x = z.double() * scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def opd64(student_lp, teacher_lp, rollout_lp, kl_coef, cap, normalizer, importance_ratio=True):
    """The loss as autograd sees it; REINFORCE form: -sum(A * student_lp)/N, whose gradient the ops follow while
    they report the value -sum(A)/N (`reinforce_value64`)."""
    advantage = kl_coef * (teacher_lp.double() - rollout_lp.double())
    if importance_ratio:
        ratio = torch.exp(torch.clamp(student_lp - rollout_lp.double(), max=cap))
        return -(ratio * advantage).sum() / normalizer
    return -(advantage * student_lp).sum() / normalizer


def reinforce_value64(teacher_lp, rollout_lp, kl_coef, normalizer):
    """The value the OPD loss reports without the importance ratio: -sum(A) / N."""
    return -kl_coef * (teacher_lp.double() - rollout_lp.double()).sum() / normalizer


def softmax_grad(logits, targets, grad_student_lp, temperature):
    """g_t * (onehot - softmax(x/T)) / T in float64."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    onehot = torch.nn.functional.one_hot(targets, logits.shape[1]).double()
    return grad_student_lp.double()[:, None] * (onehot - p) / temperature


def divergence64(objective, student_logits, teacher_logits, k=None, beta=0.5, support_logits=None):
    """The objective per row from its definition in float64 (differentiable in student_logits).

    topk_rkl's support is the top k of `support_logits` (default: student_logits), ties kept: pass the
    logits as the op rounds them, since a token that rounding moves across the k-th value changes the support.
    """
    logp_s = torch.log_softmax(student_logits.double(), dim=-1)
    logp_t = torch.log_softmax(teacher_logits.double(), dim=-1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    if objective == "full_rkl":
        return (p_s * (logp_s - logp_t)).sum(-1)
    if objective == "fkl":
        return (p_t * (logp_t - logp_s)).sum(-1)
    if objective == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        return beta * (p_t * (logp_t - m.log())).sum(-1) + (1 - beta) * (p_s * (logp_s - m.log())).sum(-1)
    # topk_rkl: the student's top-k tokens (held fixed) and one tail bucket on each side; k = V leaves no tail.
    support_logits = student_logits.detach() if support_logits is None else support_logits
    support = support_logits >= torch.topk(support_logits, k, dim=-1).values[:, -1:]
    head = torch.where(support, p_s * (logp_s - logp_t), 0.0).sum(-1)
    tail_s = torch.where(support, 0.0, p_s).sum(-1)
    tail_t = torch.where(support, 0.0, p_t).sum(-1)
    safe_s = torch.where(tail_s > 0, tail_s, 1.0)
    safe_t = torch.where(tail_s > 0, tail_t, 1.0)
    return head + torch.where(tail_s > 0, tail_s * (safe_s.log() - safe_t.log()), 0.0)


def kl64(student_logits, teacher_logits, temperature=1.0, k=None):
    """KL(p_s || p_t) of softmax(logits / T) in float64; with k, on the student's top-k support plus the tail."""
    objective = "full_rkl" if k is None else "topk_rkl"
    return divergence64(objective, student_logits.double() / temperature, teacher_logits.double() / temperature,
                        k=k, support_logits=student_logits.detach())


def make_logits(n, v, kind, dtype=torch.float32):
    """Logits [n, v] and targets [n] on DEVICE: "peaked" (the target ahead by ~40 nats: p(target) -> 1 in
    fp32), "flat" (1e-3 spread) or "normal" (3.0 spread)."""
    targets = torch.randint(0, v, (n,))
    if kind == "peaked":
        logits = torch.randn(n, v)
        logits[torch.arange(n), targets] += 40.0
    elif kind == "flat":
        logits = 1e-3 * torch.randn(n, v)
    else:
        logits = 3.0 * torch.randn(n, v)
    return logits.to(dtype).to(DEVICE), targets.to(DEVICE)


def linear_inputs(n, h, v, dtype, weight_scale=0.3):
    """hidden [n, h] and lm_head weight [v, h] (both requiring grad) and targets [n], on DEVICE."""
    hidden = torch.randn(n, h, device=DEVICE).to(dtype).requires_grad_(True)
    weight = (weight_scale * torch.randn(v, h, device=DEVICE)).to(dtype).requires_grad_(True)
    return hidden, weight, torch.randint(0, v, (n,), device=DEVICE)


def opd_inputs(logits, targets, temperature, cap, margin, lp_dtype=torch.float32):
    """(teacher_lp, rollout_lp) placing log_ratio = student_lp - rollout_lp above the cap for every third token and
    below it for the others, at least `margin` from it (rounding in the op must not move a token across)."""
    n = logits.shape[0]
    lp = lp64(logits.detach(), targets, temperature)
    side = torch.where(torch.arange(n, device=lp.device) % 3 == 0, 1.0, -1.0).double()
    log_ratio = cap + side * (margin + torch.rand(n, device=lp.device, dtype=torch.float64))
    rollout_lp = (lp - log_ratio).to(lp_dtype)
    teacher_lp = rollout_lp + torch.randn(n, device=lp.device, dtype=lp_dtype)
    return teacher_lp, rollout_lp


def float64_leaves(*tensors):
    return [t.detach().double().requires_grad_(True) for t in tensors]


def close(actual, expected, atol, rtol=0.0, what=""):
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )

"""Inputs of the loss-kernel benchmark, and the minimum work each op does on them.

Inputs look real: hidden = LayerNorm(randn), weight scaled so logits have std --logit-std, targets sampled
from the model's own softmax (on-policy tokens; Cut Cross-Entropy's gradient filtering depends on that sparsity).
"""

from __future__ import annotations

import torch

LINEAR_OPS = ("linear_logprob", "linear_opd")


def make_linear_inputs(n, v, h, logit_std, dtype, seed=0, device="cuda"):
    """hidden [N, H] (LayerNorm of Gaussian), weight [V, H], on-policy targets [N], and their fp32 lp [N]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, generator=gen)
    hidden = torch.nn.functional.layer_norm(hidden, (h,)).to(dtype)
    weight = (torch.randn(v, h, device=device, generator=gen) * (logit_std / h**0.5)).to(dtype)
    targets = torch.empty(n, dtype=torch.long, device=device)
    lp = torch.empty(n, device=device)
    entropy = torch.empty(n, device=device)
    for s in range(0, n, 2048):  # sample from the model's own softmax, a chunk of rows at a time
        logits = (hidden[s : s + 2048] @ weight.T).float()
        logp = torch.log_softmax(logits, dim=-1)
        targets[s : s + 2048] = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
        lp[s : s + 2048] = logp.gather(1, targets[s : s + 2048, None]).squeeze(1)
        entropy[s : s + 2048] = -(logp.exp() * logp).sum(-1)
    stats = f"entropy {entropy.mean().item():.2f} nats, p(target) {lp.exp().mean().item():.3f}"
    return hidden, weight, targets, lp, stats


def make_logits(hidden, weight):
    logits = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    for s in range(0, hidden.shape[0], 4096):
        torch.matmul(hidden[s : s + 4096], weight.T, out=logits[s : s + 4096])
    return logits


def opd_lps(lp, seed=1):
    gen = torch.Generator(device=lp.device).manual_seed(seed)
    rollout_lp = lp + 0.05 * torch.randn(lp.shape, device=lp.device, generator=gen)
    teacher_lp = rollout_lp + torch.randn(lp.shape, device=lp.device, generator=gen)
    return teacher_lp, rollout_lp


def build_inputs(op, n, v, h, args, dtype, base=None):
    """Inputs of one op; `base` reuses the (hidden, weight, targets, lp, stats) sampled for this shape."""
    if base is None:
        base = make_linear_inputs(n, v, h, args.logit_std, dtype)
    hidden, weight, targets, lp, stats = base
    x = dict(n=n, targets=targets)
    if op in ("opd", "linear_opd"):
        x["teacher_lp"], x["rollout_lp"] = opd_lps(lp)
    if op in ("logprob", "opd", "kl"):
        x["logits"] = make_logits(hidden, weight).requires_grad_(True)
    if op == "kl":
        teacher_hidden = (hidden.float() + 0.5 * torch.randn_like(hidden, dtype=torch.float32)).to(dtype)
        x["teacher_logits"] = make_logits(teacher_hidden, weight)
        x["teacher_hidden"] = teacher_hidden
    x["hidden"] = hidden.requires_grad_(True)
    x["weight"] = weight.requires_grad_(True)
    return x, stats


def work(op, n, v, h, elem):
    """(bytes, flops) of the op's minimum work, the same for every candidate; flops None where memory bound.

    logits ops: bytes = logits read twice + dlogits written once (KL: both logits twice, dlogits once);
    fused-linear ops: FLOPs = 6NVH (logits 2NVH, dH 2NVH, dW 2NVH), bytes = H, W read + dH, dW written.
    """
    if op in ("logprob", "opd"):
        return 3 * n * v * elem, None
    if op == "kl":
        return 5 * n * v * elem, None
    return 2 * (n * h + v * h) * elem, 6 * n * v * h


def op_shapes(op, ns, vs, hs):
    """The (N, V, H) grid of one op: logits ops take their logits from hidden @ W^T, so one H is enough there."""
    if op in LINEAR_OPS:
        return [(n, v, h) for n in ns for v in vs for h in hs]
    return [(n, v, min(hs)) for n in ns for v in vs]

"""What both backends of every op share: argument checks, the top-k support, and the in-place gradient scale.

Inputs are packed over active tokens ([N, ...], N up to millions). The checks run on the host before any
launch, so a bad shape or target id fails with a message rather than a device-side assert.
"""

from __future__ import annotations

import math

import torch

DEFAULT_CHUNK_TOKENS = 1024


def check_common(n: int, targets: torch.Tensor, temperature: float, chunk_tokens: int) -> None:
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must have shape [N]=[{n}], got {list(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


def check_targets(targets: torch.Tensor, v: int, device: torch.device) -> torch.Tensor:
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


def check_transform(logit_scale: float, softcap: float | None, side: str = "") -> tuple[float, float | None]:
    """(scale, cap) as floats, refused unless finite and > 0. Logits are x = softcap(scale * z) / T,
    softcap(u) = cap * tanh(u / cap) (Gemma 2's final_logit_softcapping; Cohere's and Granite's scales)."""
    logit_scale = float(logit_scale)
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"{side}logit_scale must be finite and > 0, got {logit_scale}")
    if softcap is not None:
        softcap = float(softcap)
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"{side}softcap must be None or finite and > 0, got {softcap}")
    return logit_scale, softcap


def check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be packed as [N, V], got shape {list(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def check_linear(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be packed as [N, H], got shape {list(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {list(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden is [N, {hidden.shape[1]}] but weight is [V, {weight.shape[1]}]: H differs")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise ValueError(f"hidden and weight must share one float dtype, got {hidden.dtype} and {weight.dtype}")


def check_opd(n: int, teacher_lp: torch.Tensor, rollout_lp: torch.Tensor, normalizer) -> None:
    for name, lp in (("teacher_lp", teacher_lp), ("rollout_lp", rollout_lp)):
        if lp.dim() != 1 or lp.shape[0] != n:
            raise ValueError(f"{name} must have shape [N]=[{n}], got {list(lp.shape)}")
    check_normalizer(n, normalizer)


def check_normalizer(n: int, normalizer) -> None:
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 and list(normalizer.shape) != [n]:
            raise ValueError(
                f"normalizer must be a float, a 0-d tensor or per-token divisors [N]=[{n}], got shape {list(normalizer.shape)}"
            )
    elif not normalizer > 0:
        raise ValueError(f"normalizer (active tokens over the whole step) must be > 0, got {normalizer}")


def check_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    check_logits(student_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must match student_logits {list(student_logits.shape)}, got {list(teacher_logits.shape)}"
        )
    if not teacher_logits.is_floating_point():
        raise ValueError(f"teacher_logits must be floating point, got {teacher_logits.dtype}")


def check_kl_args(student_logits, teacher_logits, temperature, chunk_tokens) -> None:
    check_pair(student_logits, teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


def check_k(k: int, v: int) -> None:
    if not 1 <= int(k) <= v:
        raise ValueError(f"k must be in [1, V={v}], got {k}")


def topk_threshold(student_logits: torch.Tensor, k: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """The k-th largest student logit per row, [N] in the logits dtype.

    The top-k support is {j : z_j >= threshold}: ties at the threshold are all kept, so it can hold more
    than k tokens (bf16 logits tie often); both backends use this same definition.
    """
    n = student_logits.shape[0]
    thr = torch.empty(n, dtype=student_logits.dtype, device=student_logits.device)
    for s in range(0, n, chunk_tokens):
        e = min(s + chunk_tokens, n)
        thr[s:e] = torch.topk(student_logits[s:e], k, dim=-1, sorted=False).values.amin(dim=-1)
    return thr


def scale_grad(grad: torch.Tensor | None, grad_loss: torch.Tensor) -> torch.Tensor | None:
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

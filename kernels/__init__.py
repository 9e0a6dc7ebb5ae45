"""Token log-probs, the fused OPD loss and full-vocab divergences over packed [N, ...] tokens; imports nothing from opd_local.

Each entry takes `backend="auto" | "triton" | "torch"`; "reference", the older name of "torch", is still accepted
and means the same. "auto" (the default) runs the Triton op for CUDA tensors (fp64 excepted: it is for checks,
and the torch path keeps it exact) and the chunked torch path (`kernels.torch_ops`) everywhere else. Each op has
one module in each of `kernels.triton` and `kernels.torch_ops`, which share their checks through `kernels.common`.
"triton" forces the Triton op, which is how the CPU tests run it under `TRITON_INTERPRET=1`. Options an op does
not know (e.g. `block_v` outside Triton) raise TypeError.
On a GPU the fused-linear Triton ops hand an N too small to fill it to the chunked path (see
`kernels.triton.linear_logprob`). Targets may live on the host: they are range-checked there, then copied over.

Every op takes `logit_scale` (default 1.0) and `softcap` (default None) for architectures whose logits are
not the plain product z: it scores softcap(logit_scale * z) / T, softcap(u) = cap * tanh(u / cap) (Gemma 2's
final_logit_softcapping; Cohere's logit_scale, Granite's 1 / logits_scaling), the temperature last as
transformers and vLLM apply it. Ops that compare two models also take `teacher_logit_scale` and
`teacher_softcap`. The defaults run the plain code paths, unchanged.
"""

from __future__ import annotations

import warnings

import torch

from kernels import torch_ops

# Triton ops by entry name, filled by `_load_triton_ops` on first use, e.g.
#   "token_logprobs": logprob.token_logprobs,
_TRITON_OPS: dict = {}

_BACKENDS = ("auto", "triton", "torch")
# Older spellings still accepted, by the backend each means.
_BACKEND_ALIASES = {"reference": "torch"}
_triton_error: str | None = None
_warned: set[str] = set()


def _load_triton_ops() -> None:
    """Import the Triton modules once, at first use rather than at `import kernels`.

    `triton.jit` reads TRITON_INTERPRET when a kernel is defined, so an eager import would fix the mode
    before a test can choose the interpreter; it also keeps `import kernels` cheap on CPU-only machines.
    """
    global _triton_error
    if _TRITON_OPS or _triton_error is not None:
        return
    try:
        from kernels.triton import divergence, linear_logprob, logprob
    except ImportError as exc:  # no triton wheel (macOS, Windows) or a broken install
        _triton_error = f"{type(exc).__name__}: {exc}"
        return
    _TRITON_OPS.update(
        {
            "token_logprobs": logprob.token_logprobs,
            "opd_loss": logprob.opd_loss,
            "linear_token_logprobs": linear_logprob.linear_token_logprobs,
            "linear_opd_loss": linear_logprob.linear_opd_loss,
            "full_reverse_kl": divergence.full_reverse_kl,
            "topk_reverse_kl": divergence.topk_reverse_kl,
        }
    )


# Ops with no Triton kernel: chunked torch on every device. Each chunk is two [C, H] x [H, V] matmuls
# and a few [C, V] elementwise passes, so the matmuls dominate and run in cuBLAS on a GPU.
_TORCH_ONLY = frozenset({"linear_divergence_loss"})


def _impl(name: str, x: torch.Tensor, backend: str):
    backend = _BACKEND_ALIASES.get(backend, backend)
    if backend not in _BACKENDS:
        raise ValueError(f"kernels.{name}: backend must be one of {_BACKENDS}, got {backend!r}")
    if name in _TORCH_ONLY:
        if backend == "triton":
            raise ValueError(f"kernels.{name} has no Triton kernel; use backend='auto' or 'torch'")
        return getattr(torch_ops, name)
    if backend == "torch":
        return getattr(torch_ops, name)
    if backend == "triton" or (x.is_cuda and x.dtype != torch.float64):
        _load_triton_ops()
        if name in _TRITON_OPS:
            return _TRITON_OPS[name]
        if backend == "triton":
            raise RuntimeError(
                f"kernels.{name}: backend='triton' but Triton is unavailable ({_triton_error}); "
                "install triton (Linux, `pip install triton`) or pass backend='torch'"
            )
        if name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"kernels.{name}: Triton is unavailable ({_triton_error}), running the chunked torch path "
                "on CUDA (correct, but slower and with more memory traffic); install triton to get the fused kernels",
                stacklevel=3,
            )
    return getattr(torch_ops, name)


def token_logprobs(logits, targets, temperature=1.0, *, backend="auto", **kwargs):
    """log_softmax(softcap(logit_scale * logits) / T)[i, targets[i]] -> fp32 [N]; differentiable in logits [N, V]."""
    return _impl("token_logprobs", logits, backend)(logits, targets, temperature, **kwargs)


def linear_token_logprobs(hidden, weight, targets, temperature=1.0, *, backend="auto", **kwargs):
    """Token log-probs of hidden [N, H] @ weight[V, H].T -> fp32 [N], never materialising [N, V]."""
    return _impl("linear_token_logprobs", hidden, backend)(hidden, weight, targets, temperature, **kwargs)


def opd_loss(logits, targets, teacher_lp, rollout_lp, *, backend="auto", **kwargs):
    """Sampled-token OPD loss on logits [N, V] -> (loss, student_lp); see `torch_ops.opd_loss`."""
    return _impl("opd_loss", logits, backend)(logits, targets, teacher_lp, rollout_lp, **kwargs)


def linear_opd_loss(hidden, weight, targets, teacher_lp, rollout_lp, *, backend="auto", **kwargs):
    """Sampled-token OPD loss on hidden [N, H] + lm_head weight [V, H] -> (loss, student_lp)."""
    return _impl("linear_opd_loss", hidden, backend)(hidden, weight, targets, teacher_lp, rollout_lp, **kwargs)


def full_reverse_kl(student_logits, teacher_logits, temperature=1.0, *, backend="auto", **kwargs):
    """KL(student || teacher) per token over the full vocab -> fp32 [N]; differentiable in student_logits.
    Each side has its own logit transform (`logit_scale`/`softcap`, `teacher_logit_scale`/`teacher_softcap`)."""
    return _impl("full_reverse_kl", student_logits, backend)(student_logits, teacher_logits, temperature, **kwargs)


def topk_reverse_kl(student_logits, teacher_logits, k, temperature=1.0, *, backend="auto", **kwargs):
    """Reverse KL on the student's top-k tokens plus one tail bucket -> fp32 [N]; see `torch_ops.topk_reverse_kl`."""
    return _impl("topk_reverse_kl", student_logits, backend)(student_logits, teacher_logits, k, temperature, **kwargs)


def linear_divergence_loss(hidden, weight, teacher_hidden, teacher_weight, targets, *, backend="auto", **kwargs):
    """Full-vocab full_rkl / topk_rkl / fkl / jsd from both sides' hidden states -> (loss, student_lp, D [N]);
    see `torch_ops.linear_divergence_loss`. Chunked torch on every device. Each side has its own logit transform
    (`logit_scale`/`softcap`, `teacher_logit_scale`/`teacher_softcap`)."""
    return _impl("linear_divergence_loss", hidden, backend)(
        hidden, weight, teacher_hidden, teacher_weight, targets, **kwargs
    )


__all__ = [
    "linear_divergence_loss",
    "token_logprobs",
    "linear_token_logprobs",
    "opd_loss",
    "linear_opd_loss",
    "full_reverse_kl",
    "topk_reverse_kl",
    "torch_ops",
]

"""Token log-probs and the fused OPD loss over packed [N, ...] tokens; imports nothing from opd_local.

Each entry dispatches to a Triton op for CUDA tensors once one is registered in `_TRITON_OPS`,
and to the chunked torch reference (`kernels.reference`) everywhere else.
"""

from __future__ import annotations

import warnings

import torch

from kernels import reference

# Triton ops by entry name; registering one is one line, e.g.
#   "token_logprobs": logprob.token_logprobs,
_TRITON_OPS: dict = {}

_warned: set[str] = set()


def _impl(name: str, x: torch.Tensor):
    if x.is_cuda:
        if name in _TRITON_OPS:
            return _TRITON_OPS[name]
        if name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"kernels.{name}: no Triton kernel registered yet, running the chunked torch reference on CUDA "
                "(correct, but slower and with more memory traffic)",
                stacklevel=3,
            )
    return getattr(reference, name)


def token_logprobs(logits, targets, temperature=1.0, **kwargs):
    """log_softmax(logits / T)[i, targets[i]] -> fp32 [N]; differentiable in logits [N, V]."""
    return _impl("token_logprobs", logits)(logits, targets, temperature, **kwargs)


def linear_token_logprobs(hidden, weight, targets, temperature=1.0, **kwargs):
    """Token log-probs of hidden [N, H] @ weight[V, H].T -> fp32 [N], never materialising [N, V]."""
    return _impl("linear_token_logprobs", hidden)(hidden, weight, targets, temperature, **kwargs)


def opd_loss(logits, targets, teacher_lp, rollout_lp, **kwargs):
    """Sampled-token OPD loss on logits [N, V] -> (loss, student_lp); see `reference.opd_loss`."""
    return _impl("opd_loss", logits)(logits, targets, teacher_lp, rollout_lp, **kwargs)


def linear_opd_loss(hidden, weight, targets, teacher_lp, rollout_lp, **kwargs):
    """Sampled-token OPD loss on hidden [N, H] + lm_head weight [V, H] -> (loss, student_lp)."""
    return _impl("linear_opd_loss", hidden)(hidden, weight, targets, teacher_lp, rollout_lp, **kwargs)


__all__ = ["token_logprobs", "linear_token_logprobs", "opd_loss", "linear_opd_loss", "reference"]

"""The chunked pure-torch path of every op: what `kernels` runs off CUDA (and for fp64), and the ops' second
implementation on a GPU. Each module mirrors its Triton twin in `kernels.triton`; `linear_divergence`
has no twin."""

from kernels.common import DEFAULT_CHUNK_TOKENS, topk_threshold
from kernels.torch_ops.divergence import full_reverse_kl, topk_reverse_kl
from kernels.torch_ops.linear_divergence import DIVERGENCES, linear_divergence_loss
from kernels.torch_ops.linear_logprob import linear_opd_loss, linear_token_logprobs
from kernels.torch_ops.logprob import opd_loss, token_logprobs

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "DIVERGENCES",
    "full_reverse_kl",
    "linear_divergence_loss",
    "linear_opd_loss",
    "linear_token_logprobs",
    "opd_loss",
    "token_logprobs",
    "topk_reverse_kl",
    "topk_threshold",
]

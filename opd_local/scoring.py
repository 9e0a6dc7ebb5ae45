"""Per-token logprobs of completions under a model, from packed forwards.

Used for teacher scoring (step 4), the trainer side of the parity probe and evaluation.
The logprobs come from the final hidden states and the lm_head weight through
`kernels.linear_token_logprobs`, so `[N, V]` logits are never held in memory.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

import kernels
from opd_local.models import active_hidden_and_head
from opd_local.packing import PackedBatch, pack_sequences, split_by_token_budget


def autocast_for(device: torch.device):
    """bf16 autocast over fp32 master weights on CUDA; full fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class CompletionScores(NamedTuple):
    """What scoring returns, one entry per sequence, in the order given."""

    logprobs: list[torch.Tensor]  # fp32 on the CPU, [C] per completion
    hiddens: list[torch.Tensor] | None  # [C, H] final hidden states on the model's device, when asked for


def _active_logprobs(model, batch: PackedBatch, temperature: float, chunk_tokens: int):
    active_hidden, weight = active_hidden_and_head(model, batch)
    logprobs = kernels.linear_token_logprobs(
        active_hidden, weight, batch.targets, temperature=temperature, chunk_tokens=chunk_tokens
    )
    return logprobs, active_hidden


def packed_token_logprobs(
    model, batch: PackedBatch, temperature: float = 1.0, chunk_tokens: int = 1024
) -> torch.Tensor:
    """`[N_active]` fp32 logprobs of `batch.targets`; differentiable if the model is."""
    return _active_logprobs(model, batch, temperature, chunk_tokens)[0]


@torch.no_grad()
def score_completions(
    model,
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    micro_batch_tokens: int,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    return_hidden: bool = False,
) -> CompletionScores:
    """Logprob of every completion token given its own prompt, from packed forwards.

    With `return_hidden`, also the final hidden states that predict those tokens: what the
    full-vocabulary objectives need to rebuild the teacher's logits chunk by chunk, H floats per
    token instead of V.
    """
    device = next(model.parameters()).device
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    scores: list = [None] * len(prompts)
    hiddens: list = [None] * len(prompts)
    for indices in split_by_token_budget(lengths, micro_batch_tokens):
        batch = pack_sequences([prompts[i] for i in indices], [completions[i] for i in indices]).to(device)
        with autocast_for(device):
            logprobs, active_hidden = _active_logprobs(model, batch, temperature, chunk_tokens)
        for i, seq_lp in zip(indices, torch.split(logprobs.float().cpu(), batch.completion_lengths)):
            scores[i] = seq_lp
        if return_hidden:
            for i, seq_hidden in zip(indices, torch.split(active_hidden, batch.completion_lengths)):
                hiddens[i] = seq_hidden.clone()  # a view would keep the whole micro-batch alive
    return CompletionScores(scores, hiddens if return_hidden else None)

"""Per-token logprobs of completions under a model, from packed forwards.

Used for teacher scoring (step 4), the trainer side of the parity probe and evaluation.
The logprobs come from the final hidden states and the lm_head weight through
`kernels.linear_token_logprobs`, so `[N, V]` logits are never held in memory.
"""

from __future__ import annotations

import contextlib

import torch

import kernels
from opd_local.models import active_hidden_and_head
from opd_local.packing import PackedBatch, pack_sequences, split_by_token_budget


def autocast_for(device: torch.device):
    """bf16 autocast over fp32 master weights on CUDA; full fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def packed_token_logprobs(
    model, batch: PackedBatch, temperature: float = 1.0, chunk_tokens: int = 1024
) -> torch.Tensor:
    """`[N_active]` fp32 logprobs of `batch.targets`; differentiable if the model is."""
    active_hidden, weight = active_hidden_and_head(model, batch)
    return kernels.linear_token_logprobs(
        active_hidden, weight, batch.targets, temperature=temperature, chunk_tokens=chunk_tokens
    )


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
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logprob of every completion token given its own prompt, one fp32 CPU tensor per sequence.

    With `return_hidden`, also the final hidden states that predict those tokens, one `[C, H]`
    tensor per sequence left on the model's device: what the full-vocabulary objectives need to
    rebuild the teacher's logits chunk by chunk, H floats per token instead of V.
    """
    device = next(model.parameters()).device
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    scores: list[torch.Tensor | None] = [None] * len(prompts)
    hiddens: list[torch.Tensor | None] = [None] * len(prompts)
    for indices in split_by_token_budget(lengths, micro_batch_tokens):
        batch = pack_sequences([prompts[i] for i in indices], [completions[i] for i in indices]).to(device)
        with autocast_for(device):
            active_hidden, weight = active_hidden_and_head(model, batch)
            logprobs = kernels.linear_token_logprobs(
                active_hidden, weight, batch.targets, temperature=temperature, chunk_tokens=chunk_tokens
            )
        for i, seq_lp in zip(indices, torch.split(logprobs.float().cpu(), batch.completion_lengths)):
            scores[i] = seq_lp
        if return_hidden:
            for i, seq_hidden in zip(indices, torch.split(active_hidden, batch.completion_lengths)):
                hiddens[i] = seq_hidden.clone()  # a view would keep the whole micro-batch alive
    if return_hidden:
        return scores, hiddens  # type: ignore[return-value]
    return scores  # type: ignore[return-value]

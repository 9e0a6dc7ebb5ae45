"""Per-token logprobs of completions under a model, from packed forwards: one prompt copy per
completion, or one per shared prompt with its completions behind it (on its KV cache where the
attention cannot take that layout).

Used for teacher scoring (step 4), the trainer side of the parity probe and evaluation, through
`score_completions_distributed` wherever the model may be replicated or sharded over ranks.
The logprobs come from the final hidden states and the lm_head weight through
`kernels.linear_token_logprobs`, so `[N, V]` logits are never held in memory.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch

import kernels
from opd_local.attention import supports_shared_prefix
from opd_local.distributed import all_reduce_max, call, is_sharded, unwrap
from opd_local.hidden_states import active_hidden_and_head, active_hidden_states
from opd_local.output_heads import lm_head_weight, logit_transform
from opd_local.packing import PackedBatch, pack_groups, packing_plan, pack_sequences, split_by_token_budget, split_groups_by_token_budget
from opd_local.precision import autocast_to


class CompletionScores(NamedTuple):
    """What scoring returns, one entry per sequence, in the order given."""

    logprobs: list[torch.Tensor]  # fp32 on the CPU, [C] per completion
    hiddens: list[torch.Tensor] | None  # [C, H] final hidden states on the model's device, when asked for


def packed_token_logprobs(
    model, batch: PackedBatch, temperature: float = 1.0, chunk_tokens: int = 1024, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`[N_active]` fp32 logprobs of `batch.targets`; differentiable if the model is.

    `compute_dtype` (the precision policy's) autocasts the forward and sets the loss inputs' dtype;
    None runs in the model's own dtype.
    """
    device = next(model.parameters()).device
    with autocast_to(device.type, compute_dtype):
        active_hidden, weight = active_hidden_and_head(model, batch, compute_dtype)
    scale, softcap = logit_transform(model)
    return kernels.linear_token_logprobs(
        active_hidden, weight, batch.targets, temperature=temperature, chunk_tokens=chunk_tokens, logit_scale=scale,
        softcap=softcap,
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
    shared_prefix: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> CompletionScores:
    """Logprob of every completion token given its own prompt.

    With `return_hidden`, also the final hidden states that predict those tokens: what the
    full-vocabulary objectives need to rebuild the teacher's logits chunk by chunk, H floats per
    token instead of V.

    Packed by default. With `shared_prefix`, each distinct prompt runs once with the completions that
    share it (a group's K samples) behind it in the packed row, each attending to the prompt and to
    itself (`packing.pack_groups`); packing one copy per completion recomputes the prompt K times, which
    dominates when it is long, as a privileged teacher's prompt with the worked solution is. Attention
    that cannot take that layout (flash_attention_2, a sliding window) runs the prompt once and the
    completions on its KV cache instead.

    `compute_dtype` autocasts the forwards and is the dtype of the hidden states and lm_head that the
    logprob kernel reads (and of the hidden states returned); None keeps the model's own dtype.
    """
    device = next(model.parameters()).device
    plan = packing_plan(model)  # what the start-up check proved (`packing_check`)
    micro_batch_tokens = plan.budget(micro_batch_tokens)
    make_batches = _packed_batches
    if shared_prefix and plan.packed and plan.shared_prompt:
        make_batches = _shared_row_batches if supports_shared_prefix(model.config) else _shared_prefix_batches
    scores: list = [None] * len(prompts)
    hiddens: list = [None] * len(prompts)
    weight = lm_head_weight(model)
    weight = weight.to(compute_dtype or weight.dtype)  # once per call, not per batch
    scale, softcap = logit_transform(model)
    batches = make_batches(model, prompts, completions, micro_batch_tokens, device, compute_dtype)
    order: list[int] = []
    logprob_parts: list[torch.Tensor] = []
    for indices, active_hidden, targets in batches:
        active_hidden = active_hidden.to(weight.dtype)
        logprob_parts.append(
            kernels.linear_token_logprobs(
                active_hidden, weight, targets, temperature=temperature, chunk_tokens=chunk_tokens, logit_scale=scale,
                softcap=softcap,
            )
        )
        order.extend(indices)
        if return_hidden:
            lengths = [len(completions[i]) for i in indices]
            for i, seq_hidden in zip(indices, torch.split(active_hidden, lengths)):
                hiddens[i] = seq_hidden.clone()  # a view would keep the whole micro-batch alive
    if logprob_parts:
        # One copy to the host for the whole call: a copy per micro-batch would make the host wait
        # for each micro-batch's kernels before queueing the next one's.
        all_logprobs = torch.cat(logprob_parts).float().cpu()
        for i, seq_lp in zip(order, torch.split(all_logprobs, [len(completions[i]) for i in order])):
            scores[i] = seq_lp
    return CompletionScores(scores, hiddens if return_hidden else None)


def _packed_batches(model, prompts, completions, micro_batch_tokens: int, device, compute_dtype):
    """(indices, hidden states `[N, H]` that predict their completion tokens, those tokens) per packed forward."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    for indices in split_by_token_budget(lengths, micro_batch_tokens):
        batch = pack_sequences([prompts[i] for i in indices], [completions[i] for i in indices]).to(device)
        with autocast_to(device.type, compute_dtype):
            active_hidden = active_hidden_states(model, batch)
        yield indices, active_hidden, batch.targets


def indices_by_prompt(prompts: list[list[int]]) -> list[list[int]]:
    """The indices of each distinct prompt, in order of first appearance."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(tuple(prompt), []).append(i)
    return list(by_prompt.values())


def _shared_row_batches(model, prompts, completions, micro_batch_tokens: int, device, compute_dtype):
    """The same, each distinct prompt once per packed row with the completions that share it behind it."""
    members = indices_by_prompt(prompts)
    plan = split_groups_by_token_budget(
        [len(prompts[m[0]]) for m in members], [[len(completions[i]) for i in m] for m in members], micro_batch_tokens
    )
    for segments in plan:
        indices = [members[g][k] for g, part in segments for k in part]
        batch = pack_groups(
            [(prompts[members[g][0]], [completions[members[g][k]] for k in part]) for g, part in segments]
        ).to(device)
        with autocast_to(device.type, compute_dtype):
            active_hidden = active_hidden_states(model, batch)
        yield indices, active_hidden, batch.targets


def _shared_prefix_batches(model, prompts, completions, micro_batch_tokens: int, device, compute_dtype):
    """The same for attention without the shared layout: one forward per prompt, then its completions
    as a right-padded batch on its KV cache (padding sits after every real token, so causal attention
    never reads it)."""
    decoder = model.get_decoder()
    for members in indices_by_prompt(prompts):
        prompt = prompts[members[0]]
        prefix = len(prompt) - 1  # the last prompt token predicts the first completion token
        prefix_cache = None
        if prefix > 0:
            with autocast_to(device.type, compute_dtype):
                prefix_cache = decoder(input_ids=torch.tensor([prompt[:-1]], device=device), use_cache=True).past_key_values
        budget = max(micro_batch_tokens - prefix, 1)
        for part in split_by_token_budget([len(completions[i]) for i in members], budget):
            indices = [members[j] for j in part]
            rows = [[prompt[-1], *completions[i][:-1]] for i in indices]
            width = max(len(r) for r in rows)
            input_ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
            attention_mask = torch.zeros(len(rows), prefix + width, dtype=torch.long, device=device)
            attention_mask[:, :prefix] = 1
            for k, row in enumerate(rows):
                input_ids[k, : len(row)] = torch.tensor(row, device=device)
                attention_mask[k, prefix : prefix + len(row)] = 1
            cache = None
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)  # the forward appends to it
                cache.batch_repeat_interleave(len(rows))
            position_ids = torch.arange(prefix, prefix + width, device=device).expand(len(rows), -1)
            with autocast_to(device.type, compute_dtype):
                hidden = decoder(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=cache is not None,
                ).last_hidden_state
            active_hidden = torch.cat([hidden[k, : len(completions[i])] for k, i in enumerate(indices)])
            targets = torch.tensor([t for i in indices for t in completions[i]])  # host: `kernels` checks, then copies
            yield indices, active_hidden, targets


def score_completions_distributed(
    model, prompts: list[list[int]], completions: list[list[int]], *, micro_batch_tokens: int, shared_prefix: bool = False, **kwargs
) -> CompletionScores:
    """`score_completions` on a plain, replicated or sharded model.

    `shared_prefix` applies to an unsharded model only. Sharded, each rank scores its own sequences
    in packed micro-batches, and ranks with fewer run one-token passes so that every rank makes the
    same number of forwards (each gathers every layer).
    """
    if not is_sharded(model):
        return score_completions(
            unwrap(model), prompts, completions, micro_batch_tokens=micro_batch_tokens, shared_prefix=shared_prefix, **kwargs
        )
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    # The plan's budget here too: each rank's forwards must be the ones counted for `rounds`.
    batches = split_by_token_budget(lengths, packing_plan(model.module).budget(micro_batch_tokens)) if prompts else []
    rounds = all_reduce_max(len(batches))
    parts = []
    for r in range(rounds):
        if r >= len(batches):
            call(model, score_completions, [[0]], [[0]], micro_batch_tokens=2, **kwargs)
            continue
        indices = batches[r]
        budget = sum(lengths[i] for i in indices)  # one packed forward, as score_completions would make
        out = call(
            model, score_completions, [prompts[i] for i in indices], [completions[i] for i in indices],
            micro_batch_tokens=budget, **kwargs,
        )
        parts.append((indices, out))
    return _reassemble(parts, len(prompts), kwargs.get("return_hidden", False))


def _reassemble(parts: list[tuple[list[int], CompletionScores]], n: int, with_hidden: bool) -> CompletionScores:
    scores: list = [None] * n
    hiddens: list = [None] * n
    for indices, out in parts:
        for j, i in enumerate(indices):
            scores[i] = out.logprobs[j]
            if with_hidden:
                hiddens[i] = out.hiddens[j]
    return CompletionScores(scores, hiddens if with_hidden else None)

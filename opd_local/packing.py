"""Packing prompt + completion sequences into one row, and splitting a step into micro-batches.

A packed row has `position_ids` restarting at 0 for every sequence and no attention mask,
so transformers attends block-diagonally. A group's completions can also share one copy of their
prompt (`pack_groups`): each completion's positions continue from the prompt's length, and
`opd_local.attention` reads that layout from the position ids. Only completion tokens are active:
the loss and the scores are computed on them alone, as one `[N_active]` vector in sequence order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackingPlan:
    """The row layouts a model has been proven to score exactly (`packing_check`); both until checked."""

    packed: bool = True  # several sequences in one row; else one sequence per row
    shared_prompt: bool = True  # a group's completions behind one copy of their prompt

    def budget(self, micro_batch_tokens: int) -> int:
        """The token budget of a row under this plan: 1 puts every sequence in a row of its own."""
        return micro_batch_tokens if self.packed else 1


def packing_plan(model) -> PackingPlan:
    """The plan proven for `model` (a transformers model, with or without a PEFT adapter)."""
    return getattr(model.get_decoder(), "_opd_packing_plan", PackingPlan())


def set_packing_plan(model, plan: PackingPlan) -> None:
    # On the decoder: a LoRA student and the teacher that is its base with the adapter off share it.
    model.get_decoder()._opd_packing_plan = plan


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. Onto a GPU it goes through pinned memory without waiting: a
    copy from pageable memory would make the host wait for every kernel queued before it."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long: 0 where a prompt starts; a shared prompt's completion continues from P
    cu_seqlens: torch.Tensor  # [R + 1] int32, bounds of the row's runs of consecutive positions
    logit_positions: torch.Tensor  # [N_active] long, row positions whose next token is a completion token
    targets: torch.Tensor  # [N_active] long, the completion tokens themselves; kept on the host (see `to`)
    completion_lengths: list[int]  # per completion, so per-token outputs split back with torch.split
    # Some completion follows a sibling behind their one prompt: attention must read the layout from
    # position_ids (opd_local.attention), not take every position drop for a new sequence.
    shared_prefix: bool = False

    @property
    def num_active(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device) -> "PackedBatch":
        """The row on `device`; `targets` stay on the host, where `kernels` range-check them before copying
        them over (a bad id found on a GPU is a device-side assert that kills the CUDA context)."""
        return PackedBatch(
            input_ids=to_device(self.input_ids, device),
            position_ids=to_device(self.position_ids, device),
            cu_seqlens=to_device(self.cu_seqlens, device),
            logit_positions=to_device(self.logit_positions, device),
            targets=self.targets,  # on the host: the kernels check them there before any launch
            completion_lengths=self.completion_lengths,
            shared_prefix=self.shared_prefix,
        )


def pack_sequences(prompts: list[list[int]], completions: list[list[int]]) -> PackedBatch:
    """Concatenate `prompt + completion` pairs; every completion must be non-empty."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return pack_groups([(prompt, [completion]) for prompt, completion in zip(prompts, completions)])


def pack_groups(groups: list[tuple[list[int], list[list[int]]]]) -> PackedBatch:
    """Each `(prompt, completions)` as one segment: the prompt once, then its completions one after another.

    Completion k's position ids continue the prompt's (P .. P + C_k - 1), exactly as in its own
    `prompt + completion` sequence, and the drop back to P after a sibling is what tells attention
    that it sees the first P tokens of its segment and itself, never the sibling. A group of one
    completion is the plain packed sequence.
    """
    input_ids: list[int] = []
    position_ids: list[int] = []
    cu_seqlens = [0]
    logit_positions: list[int] = []
    targets: list[int] = []
    completion_lengths: list[int] = []
    for i, (prompt, completions) in enumerate(groups):
        if not prompt or not completions or not all(completions):
            raise ValueError(f"sequence {i}: prompt and completion must both be non-empty")
        input_ids.extend(prompt)
        position_ids.extend(range(len(prompt)))
        # Every completion's first token is predicted from the last prompt position, which all siblings share.
        last_prompt = len(input_ids) - 1
        for completion in completions:
            start = len(input_ids)
            input_ids.extend(completion)
            position_ids.extend(range(len(prompt), len(prompt) + len(completion)))
            cu_seqlens.append(len(input_ids))
            # The logit at position p predicts token p + 1; inside the completion, p is the previous token's.
            logit_positions.append(last_prompt)
            logit_positions.extend(range(start, start + len(completion) - 1))
            targets.extend(completion)
            completion_lengths.append(len(completion))
    return PackedBatch(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
        logit_positions=torch.tensor(logit_positions, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        completion_lengths=completion_lengths,
        shared_prefix=any(len(completions) > 1 for _, completions in groups),
    )


def split_by_token_budget(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive index groups whose total length fits `budget`.

    A sequence longer than the budget gets a micro-batch of its own rather than being cut:
    truncating a completion would change which tokens carry loss.
    """
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if current and used + length > budget:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        batches.append(current)
    return batches


def split_groups_by_token_budget(
    prompt_lengths: list[int], completion_lengths: list[list[int]], budget: int
) -> list[list[tuple[int, list[int]]]]:
    """Micro-batches of `(group index, completion indices)` segments for `pack_groups`, in order.

    A segment costs its real tokens, the prompt once plus its completions. A group that fits the
    budget stays one segment and is never split across micro-batches. A larger group is cut into
    consecutive parts that fit, each repeating the prompt; a prompt and one completion that alone
    exceed the budget make a micro-batch of their own, as an over-long sequence does in
    `split_by_token_budget`.
    """
    if len(prompt_lengths) != len(completion_lengths):
        raise ValueError(f"{len(prompt_lengths)} prompts but {len(completion_lengths)} completion groups")
    segments: list[tuple[int, list[int]]] = []
    for group, (prompt_length, lengths) in enumerate(zip(prompt_lengths, completion_lengths)):
        for part in split_by_token_budget(lengths, max(budget - prompt_length, 1)):
            segments.append((group, part))
    costs = [prompt_lengths[g] + sum(completion_lengths[g][k] for k in part) for g, part in segments]
    return [[segments[i] for i in batch] for batch in split_by_token_budget(costs, budget)]

"""Packing prompt + completion sequences into one row, and splitting a step into micro-batches.

A packed row has `position_ids` restarting at 0 for every sequence and no attention mask,
so transformers attends block-diagonally. Only completion tokens are active: the loss and the
scores are computed on them alone, as one `[N_active]` vector in sequence order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. Onto a GPU it goes through pinned memory without waiting: a
    copy from pageable memory would make the host wait for every kernel queued before it."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long, restarting at 0 per sequence
    cu_seqlens: torch.Tensor  # [S + 1] int32, sequence boundaries in the row
    logit_positions: torch.Tensor  # [N_active] long, row positions whose next token is a completion token
    targets: torch.Tensor  # [N_active] long, the completion tokens themselves; kept on the host (see `to`)
    completion_lengths: list[int]  # per sequence, so per-token outputs split back with torch.split

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
        )


def pack_sequences(prompts: list[list[int]], completions: list[list[int]]) -> PackedBatch:
    """Concatenate `prompt + completion` pairs; every completion must be non-empty."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    input_ids: list[int] = []
    position_ids: list[int] = []
    cu_seqlens = [0]
    logit_positions: list[int] = []
    targets: list[int] = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if not prompt or not completion:
            raise ValueError(f"sequence {i}: prompt and completion must both be non-empty")
        start = len(input_ids)
        sequence = list(prompt) + list(completion)
        input_ids.extend(sequence)
        position_ids.extend(range(len(sequence)))
        cu_seqlens.append(len(input_ids))
        # The logit at position p predicts token p + 1, so the first completion token is
        # predicted from the last prompt position.
        first = start + len(prompt) - 1
        logit_positions.extend(range(first, first + len(completion)))
        targets.extend(completion)
    return PackedBatch(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
        logit_positions=torch.tensor(logit_positions, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        completion_lengths=[len(c) for c in completions],
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

"""The rollout engine interface: what every sampler takes and gives back, and how rollouts are seeded.

A sampler owns its own copy of the student's weights, like an inference engine does:
after every optimizer step the trainer pushes the new weights in, and the parity probe
checks that the copy really matches.
"""

from __future__ import annotations

import abc
import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from opd_local.weight_fingerprint import differing, fingerprints


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token, under the distribution it was sampled from
    finish_reason: str  # "stop" (end-of-sequence sampled) or "length" (max_tokens reached)


def per_prompt_seeds(seed: int | list[int], num_prompts: int, n: int) -> list[int]:
    """One seed per prompt; from an int, `n` apart. vLLM draws sample j of a request from the
    stream `seed + j` (vllm/v1/engine/parallel_sampling.py), so seeds closer than `n` would make
    two prompts' samples share streams."""
    if isinstance(seed, int):
        return [seed + i * n for i in range(num_prompts)]
    if len(seed) != num_prompts:
        raise ValueError(f"{len(seed)} seeds for {num_prompts} prompts")
    return list(seed)


def rollout_seeds(run_seed: int, step: int, num_groups: int, n: int) -> list[int]:
    """The seeds of a step's prompt groups, by their place in the step's global batch, so that a
    group's samples do not depend on how many ranks split the step. Within a step they are `n`
    apart; steps start from a hash of (run seed, step), 56 bits, so steps do not overlap either.
    Any run seed gives seeds below 2**56 + num_groups * n, well within the 2**64 that torch's
    generators (the HF sampler's, vLLM's per request) take."""
    digest = hashlib.blake2b(f"{run_seed}/{step}".encode(), digest_size=7).digest()
    return per_prompt_seeds(int.from_bytes(digest, "little"), num_groups, n)


class Sampler(abc.ABC):
    dtype: torch.dtype  # what the engine holds its weights in; pushed tensors are cast to it
    # The names `push_weights` takes: the trainer module's own ("module") or its checkpoint's ("checkpoint",
    # `samplers.engine_layout.checkpoint_layout`).
    weight_layout = "module"
    # `weight_fingerprint.fingerprints(self.engine_weights())` as the engine loaded them from the model's
    # directory: what a push of the same weights must reproduce bit for bit (`sync.prove_push`).
    loaded_fingerprints: dict[str, torch.Tensor] | None = None

    @abc.abstractmethod
    def generate(
        self, prompt_ids: list[list[int]], n: int, temperature: float, max_tokens: int, seed: int | list[int]
    ) -> list[list[Completion]]:
        """`n` completions for each prompt, in prompt order.

        Sampling is seeded per prompt (`seed[i]`, or `seed + i * n` for an int), so a prompt's samples
        do not depend on which other prompts share the call, e.g. on how many ranks split a step.
        Sample j of prompt i may draw from the stream `seed[i] + j`: seeds must be `n` apart.
        """

    @abc.abstractmethod
    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's current weights in place."""

    def stored(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as a push sends it: in the engine's dtype, cast once on the trainer's side, except a state-space
        layer's `A_log`, which vLLM keeps in fp32 (Mamba2 and Gated DeltaNet layers; Mamba2's loader stores
        `-exp(A_log)`) and takes from the checkpoint as saved. Casting it first would round it to the engine's
        dtype; the push proof shows either choice on every other tensor (a GptOss router bias, say, must be
        rounded as vLLM's first load rounds it)."""
        return tensor if name.endswith("A_log") else tensor.to(self.dtype)

    @abc.abstractmethod
    def engine_weights(self) -> dict[str, torch.Tensor]:
        """The engine's floating-point weights that every push must write, under the engine's own names."""

    def prove_push(self, push: Callable[[], None]) -> list[str]:
        """The engine tensors that `push` (of the weights the engine loaded) leaves other than the engine loaded them.

        Every weight is first overwritten with NaN, so a tensor the push skips shows as well as one it
        misplaces."""
        if self.loaded_fingerprints is None:
            raise RuntimeError("prove_push needs an engine that recorded its weights as loaded (samplers.make_sampler)")
        for tensor in self.engine_weights().values():
            tensor.data.fill_(math.nan)
        push()
        return differing(self.loaded_fingerprints, fingerprints(self.engine_weights()))

    @abc.abstractmethod
    def score(self, ids: list[int]) -> list[float]:
        """Logprob of `ids[1:]`, each given the tokens before it (temperature 1)."""

    def release_memory(self) -> None:
        """Give back accelerator memory while the trainer runs; the next push restores it."""

    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[Completion]:
        return [group[0] for group in self.generate(prompt_ids, 1, 0.0, max_tokens, seed=0)]

    def close(self) -> None:
        pass

"""The rollout engine interface and its transformers `generate` implementation.

A sampler owns its own copy of the student's weights, like an inference engine does:
after every optimizer step the trainer pushes the new weights in, and the parity probe
checks that the copy really matches.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from opd_local.config import ModelConfig
from opd_local.models import load_causal_lm


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
    apart; steps start from a hash of (run seed, step), 56 bits, so steps do not overlap either."""
    digest = hashlib.blake2b(f"{run_seed}/{step}".encode(), digest_size=7).digest()
    return per_prompt_seeds(int.from_bytes(digest, "little"), num_groups, n)


class Sampler(abc.ABC):
    dtype: torch.dtype  # what the engine holds its weights in; pushed tensors are cast to it

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

    @abc.abstractmethod
    def score(self, ids: list[int]) -> list[float]:
        """Logprob of `ids[1:]`, each given the tokens before it (temperature 1)."""

    def release_memory(self) -> None:
        """Give back accelerator memory while the trainer runs; the next push restores it."""

    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[Completion]:
        return [group[0] for group in self.generate(prompt_ids, 1, 0.0, max_tokens, seed=0)]

    def close(self) -> None:
        pass


class HFSampler(Sampler):
    """transformers `generate` on a private copy of the student: the portable fallback."""

    def __init__(self, model, eos_token_id: int, pad_token_id: int):
        """Wraps `model` as it is; `load` makes the private copy the trainer uses as its engine."""
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    @classmethod
    def load(
        cls, model_path: str, model_cfg: ModelConfig, device: torch.device, eos_token_id: int, pad_token_id: int,
        dtype: torch.dtype = torch.float32,
    ):
        model = load_causal_lm(model_path, model_cfg, dtype, device)
        model.eval()
        model.requires_grad_(False)
        return cls(model, eos_token_id, pad_token_id)

    def generate(self, prompt_ids, n, temperature, max_tokens, seed):
        seeds = per_prompt_seeds(seed, len(prompt_ids), n)
        if temperature == 0.0:  # no randomness: batch every prompt into one call
            return self._generate_batch(prompt_ids, n, temperature, max_tokens, seeds[0])
        # One call per prompt: generate() draws from one global RNG, so a per-prompt seed
        # needs a call of its own.
        return [self._generate_batch([p], n, temperature, max_tokens, s)[0] for p, s in zip(prompt_ids, seeds)]

    @torch.no_grad()
    def _generate_batch(self, prompt_ids, n, temperature, max_tokens, seed):
        greedy = temperature == 0.0
        # A fresh config so that the checkpoint's own top_k/top_p/penalties cannot reshape the
        # distribution: rollout_lp must be the log-softmax of logits / temperature and nothing else.
        generation_config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_k=None if greedy else 0,
            top_p=None if greedy else 1.0,
            max_new_tokens=max_tokens,
            num_return_sequences=n,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompt_ids):  # left padding, so every prompt ends at column `width`
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=generation_config,
            )
        new_tokens = out.sequences[:, width:].cpu()  # [len(prompts) * n, steps]
        steps = new_tokens.shape[1]
        if steps == 0:
            return [[Completion([], [], "length") for _ in range(n)] for _ in prompt_ids]
        scores = torch.stack(out.scores, dim=1).float()  # [B * n, steps, V], already divided by T
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.to(scores.device)[..., None])[..., 0].cpu()
        completions = []
        for row in range(new_tokens.shape[0]):
            tokens = new_tokens[row].tolist()
            if self.eos_token_id in tokens:
                length, reason = tokens.index(self.eos_token_id) + 1, "stop"
            else:
                length, reason = len(tokens), "length"
            completions.append(Completion(tokens[:length], logprobs[row, :length].tolist(), reason))
        return [completions[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    @torch.no_grad()
    def push_weights(self, named_tensors):
        params = dict(self.model.named_parameters(remove_duplicate=False))
        updated = set()
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"push_weights: the engine has no parameter {name!r}")
            params[name].copy_(tensor.detach().to(params[name].dtype))
            updated.add(name)
        missing = set(params) - updated
        if missing:
            raise KeyError(f"push_weights: no tensor for {len(missing)} engine parameters, e.g. {sorted(missing)[:3]}")

    @torch.no_grad()
    def score(self, ids):
        input_ids = torch.tensor([ids], device=self.device)
        logits = self.model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, input_ids[0, 1:, None])[:, 0].tolist()


"""transformers `generate` as the rollout engine, on a private copy of the student: the portable fallback."""

from __future__ import annotations

import math

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from opd_local.config import ModelConfig
from opd_local.models import load_causal_lm, saved_tensors
from opd_local.samplers.base import Completion, Sampler, per_prompt_seeds
from opd_local.weight_fingerprint import fingerprints


class RowSeededSampling(LogitsProcessor):
    """Samples each row of a batched `generate` from softmax(logits / temperature) with the row's own
    torch.Generator: one uniform per row and step, turned into a token by the inverse CDF. A row's
    tokens then depend on its seed and its own logits only, not on the rows beside it (`generate`'s
    own sampling draws every row from one global stream). Returns scores that leave only the drawn
    token standing, for greedy decoding to take, and records its logprob under the sampled distribution."""

    def __init__(self, seeds: list[int], temperature: float, device: torch.device):
        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.steps: list[torch.Tensor] = []  # per step: [rows] logprob of the drawn token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logprobs = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        cdf = logprobs.exp().cumsum(dim=-1)
        uniform = torch.cat([torch.rand(1, generator=g, device=scores.device) for g in self.generators])
        # right: the first token whose cumulative mass exceeds the draw, so a token of probability 0 never is.
        tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp_(max=scores.shape[-1] - 1)
        self.steps.append(logprobs.gather(-1, tokens)[:, 0])
        chosen = torch.full_like(scores, -math.inf)
        return chosen.scatter_(-1, tokens, 0.0)

    def logprobs(self) -> torch.Tensor:
        """[rows, steps] on the host, copied once."""
        return torch.stack(self.steps, dim=1).cpu()


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
        sampler = cls(model, eos_token_id, pad_token_id)
        sampler.loaded_fingerprints = fingerprints(sampler.engine_weights())
        return sampler

    def engine_weights(self):
        return {name: t for name, t in saved_tensors(self.model) if t.is_floating_point()}

    @torch.no_grad()
    def generate(self, prompt_ids, n, temperature, max_tokens, seed):
        """Every prompt's `n` samples in one batched `generate`; sample j of prompt i draws from its own
        stream, `seed[i] + j`, so it does not depend on which other prompts share the call."""
        greedy = temperature == 0.0
        sampling = None if greedy else RowSeededSampling(
            [s + j for s in per_prompt_seeds(seed, len(prompt_ids), n) for j in range(n)], temperature, self.device
        )
        # A fresh config so that the checkpoint's own top_k/top_p/penalties cannot reshape the distribution:
        # rollout_lp must be the log-softmax of logits / temperature and nothing else. Sampling itself is the
        # logits processor's, so `generate` only takes the token it leaves standing.
        generation_config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            output_scores=greedy,
            return_dict_in_generate=True,
        )
        rows = [p for p in prompt_ids for _ in range(n)]  # greedy decoding takes no num_return_sequences
        width = max(len(p) for p in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(rows):  # left padding, so every prompt ends at column `width`
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([sampling] if sampling else []),
        )
        new_tokens = out.sequences[:, width:].cpu()  # [len(prompts) * n, steps]
        steps = new_tokens.shape[1]
        if steps == 0:
            return [[Completion([], [], "length") for _ in range(n)] for _ in prompt_ids]
        if greedy:
            scores = torch.stack(out.scores, dim=1).float()  # [B * n, steps, V]
            logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.to(scores.device)[..., None])[..., 0].cpu()
        else:
            logprobs = sampling.logprobs()
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
        params = dict(saved_tensors(self.model))
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


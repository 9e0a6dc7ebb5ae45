"""HFSampler: one batched `generate` per call, each sample drawn from its own seeded stream."""

from __future__ import annotations

import pytest
import torch

from opd_local.config import ModelConfig
from opd_local.samplers.hf import HFSampler, RowSeededSampling


@pytest.fixture(scope="module")
def sampler(tiny_model_dir, tokenizer):
    return HFSampler.load(tiny_model_dir, ModelConfig(), torch.device("cpu"), tokenizer.eos_token_id, tokenizer.pad_token_id)


def _prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"]


def test_a_samples_tokens_do_not_depend_on_the_rest_of_the_batch(sampler, tokenizer):
    short, long = _prompt(tokenizer, "Write one word."), _prompt(tokenizer, "What is 7 times 6? Explain it twice, slowly.")
    (alone,) = sampler.generate([short], n=2, temperature=1.0, max_tokens=16, seed=[100])
    batched = sampler.generate([long, short, long], n=2, temperature=1.0, max_tokens=16, seed=[7, 100, 300])
    assert [c.token_ids for c in batched[1]] == [c.token_ids for c in alone]
    for a, b in zip(alone, batched[1]):
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-4)
    # A different seed gives different samples, and so does sample j vs j+1 of one prompt.
    (other,) = sampler.generate([short], n=2, temperature=1.0, max_tokens=16, seed=[101])
    assert other[0].token_ids == alone[1].token_ids  # sample 0 of seed 101 is stream 101 = sample 1 of seed 100
    assert other[1].token_ids != alone[1].token_ids and alone[0].token_ids != alone[1].token_ids


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_are_the_tempered_distribution(sampler, tokenizer, temperature):
    prompt = _prompt(tokenizer, "What is 7 times 6?")
    (group,) = sampler.generate([prompt], n=3, temperature=temperature, max_tokens=12, seed=[5])
    ids = torch.tensor([prompt + group[0].token_ids])
    with torch.no_grad():
        logits = sampler.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double() / temperature
    reference = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None])[:, 0]
    torch.testing.assert_close(torch.tensor(group[0].logprobs, dtype=torch.float64), reference, rtol=0, atol=1e-4)


def test_draws_follow_softmax_of_logits_over_temperature():
    """Frequencies over 20000 independently seeded rows against the exact probabilities (float64)."""
    rows, temperature = 20000, 0.8
    logits = torch.tensor([[1.0, -0.5, 2.0, 0.0, -40.0]])
    processor = RowSeededSampling(list(range(rows)), temperature, torch.device("cpu"))
    kept = processor(torch.zeros(rows, 1, dtype=torch.long), logits.expand(rows, -1).clone())
    tokens = kept.argmax(-1)
    assert torch.isneginf(kept).sum() == rows * (logits.shape[1] - 1)  # one token left standing per row
    frequencies = torch.bincount(tokens, minlength=logits.shape[1]).double() / rows
    expected = torch.softmax(logits[0].double() / temperature, -1)
    # 5 standard errors of a binomial proportion; the token of probability ~1e-22 is never drawn.
    assert ((frequencies - expected).abs() <= 5 * (expected * (1 - expected) / rows).sqrt() + 1e-12).all()
    torch.testing.assert_close(processor.logprobs()[:, 0].double(), torch.log(expected[tokens]), rtol=0, atol=1e-5)

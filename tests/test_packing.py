"""Packed forwards equal unpacked ones, for the student and the teacher prompt layouts."""

import pytest
import torch

from opd_local.config import ModelConfig
from opd_local.models import final_hidden_states, load_causal_lm
from opd_local.packing import pack_sequences, split_by_token_budget
from opd_local.scoring import score_completions


def _reference_logprobs(model, prompt, completion):
    """Plain unpacked HF forward with the model's own logits (no packing, no kernels)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logprobs[positions, torch.tensor(completion)]


def _sequences(tokenizer):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"]
        for text in ("What is 2 + 2?", "Name a prime number larger than ten, please.", "Hi")
    ]
    completions = [torch.randint(0, len(tokenizer), (n,), generator=g).tolist() for n in (7, 1, 13)]
    return prompts, completions


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_teacher_dir"])
def test_packed_logprobs_equal_unpacked(request, tokenizer, model_fixture):
    model = load_causal_lm(request.getfixturevalue(model_fixture), ModelConfig(), torch.float32, torch.device("cpu"))
    prompts, completions = _sequences(tokenizer)
    packed = score_completions(model, prompts, completions, micro_batch_tokens=10_000).logprobs
    one_by_one = score_completions(model, prompts, completions, micro_batch_tokens=1).logprobs
    for p, c, lp_packed, lp_single in zip(prompts, completions, packed, one_by_one):
        reference = _reference_logprobs(model, p, c)
        assert lp_packed.shape == (len(c),)
        torch.testing.assert_close(lp_packed.double(), reference, atol=2e-4, rtol=0)
        torch.testing.assert_close(lp_packed, lp_single, atol=2e-4, rtol=0)


@pytest.mark.parametrize("budget", [10_000, 40])  # 40: a group's completions split over several batches
def test_shared_prefix_scoring_equals_packed(tokenizer, tiny_model_dir, budget):
    """Groups of 3, 1 and 2 completions of uneven length (one of a single token), interleaved as a
    step's rollouts are: each prompt's KV cache reused by its group gives the packed logprobs and hidden states."""
    model = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    group_prompts, _ = _sequences(tokenizer)
    g = torch.Generator().manual_seed(7)
    order = [0, 1, 0, 2, 0, 2]
    prompts = [group_prompts[k] for k in order]
    completions = [torch.randint(0, len(tokenizer), (n,), generator=g).tolist() for n in (9, 4, 1, 12, 5, 3)]
    kwargs = dict(temperature=0.7, return_hidden=True)
    packed = score_completions(model, prompts, completions, micro_batch_tokens=10_000, **kwargs)
    shared = score_completions(model, prompts, completions, micro_batch_tokens=budget, shared_prefix=True, **kwargs)
    for c, lp_packed, lp_shared, h_packed, h_shared in zip(completions, packed.logprobs, shared.logprobs, packed.hiddens, shared.hiddens):
        assert lp_shared.shape == (len(c),) and h_shared.shape == h_packed.shape
        torch.testing.assert_close(lp_shared, lp_packed, atol=2e-5, rtol=0)
        torch.testing.assert_close(h_shared, h_packed, atol=2e-5, rtol=1e-5)


def test_packed_batch_layout():
    batch = pack_sequences([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]])
    assert batch.input_ids.tolist() == [[5, 6, 7, 9, 10, 8, 11, 12, 13]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert batch.cu_seqlens.tolist() == [0, 5, 9]
    # the logit at each listed position predicts the completion token at the next position
    assert batch.input_ids[0, batch.logit_positions + 1].tolist() == batch.targets.tolist() == [9, 10, 11, 12, 13]
    assert batch.completion_lengths == [2, 3]
    with pytest.raises(ValueError, match="non-empty"):
        pack_sequences([[1]], [[]])


def test_split_by_token_budget_keeps_order_and_budget():
    lengths = [3, 4, 2, 9, 1, 1]
    batches = split_by_token_budget(lengths, budget=6)
    assert [i for b in batches for i in b] == list(range(len(lengths)))
    for b in batches:
        assert sum(lengths[i] for i in b) <= 6 or len(b) == 1  # an over-long sequence sits alone
    assert batches == [[0], [1, 2], [3], [4, 5]]


# flex_attention runs uncompiled (eager) on the CPU: slow but exact, enough for a tiny model.
@pytest.mark.parametrize("path", ["per_sequence", "flex", "sdpa"])
def test_every_packed_attention_path_equals_unpacked(tokenizer, tiny_model_dir, monkeypatch, path):
    monkeypatch.setenv("OPD_PACKED_ATTENTION", path)
    model = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    prompts, completions = _sequences(tokenizer)
    packed = score_completions(model, prompts, completions, micro_batch_tokens=10_000).logprobs
    for p, c, lp_packed in zip(prompts, completions, packed):
        torch.testing.assert_close(lp_packed.double(), _reference_logprobs(model, p, c), atol=2e-4, rtol=0)


def test_packed_forward_builds_no_quadratic_mask(tokenizer, tiny_model_dir, monkeypatch):
    """The default path attends within each sequence without the [T, T] block-diagonal mask sdpa would get."""
    model = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    prompts, completions = _sequences(tokenizer)
    batch = pack_sequences(prompts, completions)
    t = batch.input_ids.shape[1]
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        seen.append((query.shape[-2], None if attn_mask is None else tuple(attn_mask.shape)))
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        final_hidden_states(model, batch.input_ids, batch.position_ids)
    assert seen and all(mask is None for _, mask in seen), seen
    assert max(q for q, _ in seen) < t  # one call per sequence, never the whole row

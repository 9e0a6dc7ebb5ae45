"""Packed forwards equal unpacked ones, for the student and the teacher prompt layouts."""

import pytest
import torch

from opd_local.config import ModelConfig
from opd_local.models import load_causal_lm
from opd_local.hidden_states import final_hidden_states
from opd_local import attention, scoring
from opd_local.attention import row_layout
from opd_local.packing import pack_groups, pack_sequences, split_by_token_budget, split_groups_by_token_budget
from opd_local.scoring import packed_token_logprobs, score_completions


def _reference_logprobs(model, prompt, completion, temperature=1.0):
    """Plain unpacked HF forward with the model's own logits (no packing, no kernels)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature
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
@pytest.mark.parametrize("layout", ["row", "kv_cache"])
def test_shared_prefix_scoring_equals_packed(tokenizer, tiny_model_dir, monkeypatch, budget, layout):
    """Groups of 3, 1 and 2 completions of uneven length (one of a single token), interleaved as a
    step's rollouts are: each prompt once with its group behind it in the row, or its KV cache reused by
    its group (attention without the shared layout), gives the packed logprobs and hidden states."""
    if layout == "kv_cache":
        monkeypatch.setattr(scoring, "supports_shared_prefix", lambda config: False)
    model = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    group_prompts, _ = _sequences(tokenizer)
    g = torch.Generator().manual_seed(7)
    order = [0, 1, 0, 2, 0, 2]
    prompts = [group_prompts[k] for k in order]
    completions = [torch.randint(0, len(tokenizer), (n,), generator=g).tolist() for n in (9, 4, 1, 12, 5, 3)]
    kwargs = dict(temperature=0.7, return_hidden=True)
    packed = score_completions(model, prompts, completions, micro_batch_tokens=10_000, **kwargs)
    forwards = []
    model.get_decoder().register_forward_hook(lambda *args: forwards.append(1))
    shared = score_completions(model, prompts, completions, micro_batch_tokens=budget, shared_prefix=True, **kwargs)
    if budget == 10_000:  # the row: one forward in all; the cache: the 3 prompts, then each one's completions
        assert len(forwards) == (1 if layout == "row" else 6)
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


def test_shared_prefix_layout():
    """One prompt copy per group; each completion's positions continue the prompt's; every first
    completion token is predicted from the one last prompt position."""
    batch = pack_groups([([5, 6, 7], [[9, 10], [11], [12, 13, 14]]), ([8], [[15, 16]])])
    assert batch.input_ids.tolist() == [[5, 6, 7, 9, 10, 11, 12, 13, 14, 8, 15, 16]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 3, 4, 5, 0, 1, 2]]
    assert batch.logit_positions.tolist() == [2, 3, 2, 2, 6, 7, 9, 10]
    assert batch.targets.tolist() == [9, 10, 11, 12, 13, 14, 15, 16]
    assert batch.completion_lengths == [2, 1, 3, 2] and batch.shared_prefix
    assert batch.cu_seqlens.tolist() == [0, 5, 6, 9, 12]
    # (start, end, prefix start, prefix end): the siblings see the prompt's 3 tokens, the next group nothing before it
    assert row_layout(batch.position_ids) == [(0, 5, 0, 0), (5, 6, 0, 3), (6, 9, 0, 3), (9, 12, 9, 9)]
    unshared = pack_groups([([5, 6, 7], [[9, 10]]), ([8], [[15, 16]])])
    assert not unshared.shared_prefix
    assert unshared.input_ids.tolist() == pack_sequences([[5, 6, 7], [8]], [[9, 10], [15, 16]]).input_ids.tolist()
    with pytest.raises(ValueError, match="does not hold positions 0..2"):  # a continuation longer than its sequence's head
        row_layout(torch.tensor([[0, 1, 3, 4]]))
    with pytest.raises(ValueError, match="does not hold"):  # nor may it continue a row that began mid-sequence
        row_layout(torch.tensor([[5, 6, 7, 5, 6]]))


def test_split_groups_by_token_budget_keeps_groups_whole_when_they_fit():
    prompts = [4, 3, 10, 2]
    completions = [[2, 3], [5], [4, 6, 1], [1, 1]]
    batches = split_groups_by_token_budget(prompts, completions, budget=12)
    # group 0 costs 9 and group 1 costs 8: each whole, in its own micro-batch. Group 2 (prompt 10) is cut:
    # prompt + 4 = 14 and prompt + 6 = 16 exceed the budget alone, prompt + 1 fits; group 3 (cost 4) follows.
    assert batches == [[(0, [0, 1])], [(1, [0])], [(2, [0])], [(2, [1])], [(2, [2])], [(3, [0, 1])]]
    assert split_groups_by_token_budget(prompts, completions, budget=100) == [[(0, [0, 1]), (1, [0]), (2, [0, 1, 2]), (3, [0, 1])]]
    # every completion appears exactly once, in order
    flat = [(g, k) for b in split_groups_by_token_budget(prompts, completions, budget=7) for g, ks in b for k in ks]
    assert flat == [(g, k) for g, c in enumerate(completions) for k in range(len(c))]


def _shared_groups(tokenizer):
    """Three prompts with 3 (ragged, one of a single token), 1 and 2 completions."""
    prompts, _ = _sequences(tokenizer)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    lengths = [(9, 1, 14), (5,), (7, 3)]
    return [(p, [torch.randint(0, len(tokenizer), (n,), generator=g).tolist() for n in ns]) for p, ns in zip(prompts, lengths)]


# Every attention a CPU runs: PACKED_SDPA on each of its paths (flex uncompiled), and eager with its dense mask.
ATTENTION_SETTINGS = [("sdpa", "per_sequence"), ("sdpa", "flex"), ("sdpa", "sdpa"), ("eager", "")]


@pytest.mark.parametrize("implementation,path", ATTENTION_SETTINGS)
def test_shared_prefix_logprobs_equal_unshared(tokenizer, tiny_model_dir, monkeypatch, float64_norms, implementation, path):
    monkeypatch.setenv("OPD_PACKED_ATTENTION", path)
    model = load_causal_lm(tiny_model_dir, ModelConfig(attn_implementation=implementation), torch.float64, torch.device("cpu"))
    groups = _shared_groups(tokenizer)
    shared = pack_groups(groups)
    unshared = pack_sequences([p for p, cs in groups for _ in cs], [c for _, cs in groups for c in cs])
    assert shared.input_ids.shape[1] < unshared.input_ids.shape[1]
    with torch.no_grad():  # flex_attention has no backward on the CPU; the gradients are test_loop's
        lp_shared = packed_token_logprobs(model, shared, temperature=0.7)
        lp_unshared = packed_token_logprobs(model, unshared, temperature=0.7)
    assert not attention._flex_failed  # the flex case ran flex, not the fallback
    # eager takes its softmax in fp32 whatever the model's dtype, over rows of another length and order
    atol = 5e-6 if implementation == "eager" else 1e-12
    torch.testing.assert_close(lp_shared, lp_unshared, atol=atol, rtol=0)
    # and each equals its plain, unpacked forward
    reference = torch.cat([_reference_logprobs(model, p, c, temperature=0.7) for p, cs in groups for c in cs])
    torch.testing.assert_close(lp_shared.double(), reference, atol=atol, rtol=0)


def test_shared_prefix_forward_builds_no_quadratic_mask(tokenizer, tiny_model_dir, monkeypatch):
    """Each completion attends to the prompt's keys and its own, a [C, P + C] mask, never the row's [T, T]."""
    model = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    batch = pack_groups(_shared_groups(tokenizer))
    t = batch.input_ids.shape[1]
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        seen.append((query.shape[-2], key.shape[-2]))
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        packed_token_logprobs(model, batch)
    assert seen and max(k for _, k in seen) < t


def test_rows_with_shared_prompts_leave_the_flash_path(tokenizer, tiny_model_dir, monkeypatch):
    """flash-attn's varlen kernel sees whole sequences only: a row with shared prompts must go per run
    (on a CPU, where flash-attn is absent, the flash path would fail if it were taken)."""
    model = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float64, torch.device("cpu"))
    batch = pack_groups(_shared_groups(tokenizer))
    results = {}
    for path in ("flash", "per_sequence"):
        monkeypatch.setenv("OPD_PACKED_ATTENTION", path)
        with torch.no_grad():
            results[path] = packed_token_logprobs(model, batch)
    torch.testing.assert_close(results["flash"], results["per_sequence"], atol=0, rtol=0)

"""The fused kernels compute logits as hidden @ lm_head.weight.T: a model whose logits are anything else is refused."""

from __future__ import annotations

import pytest
import torch

from opd_local.config import ModelConfig
from opd_local.models import apply_lora, check_output_heads, final_hidden_states, lm_head_weight, output_head_problem


def _llama(tokenizer, **changes):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, **changes,
    )
    return LlamaForCausalLM(config).eval()


def _with_head_bias(tokenizer):
    model = _llama(tokenizer)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(model.config.vocab_size))
    return model


def _softcapped(tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5,  # small, so the cap changes these logits
    )
    return Gemma2ForCausalLM(config).eval()


def _lora_on_head(tokenizer):
    model = apply_lora(_llama(tokenizer), ModelConfig(lora_rank=2, lora_target_modules="q_proj,lm_head"))
    for name, param in model.named_parameters():
        if "lm_head" in name and "lora_B" in name:
            torch.nn.init.normal_(param)  # a trained adapter: B is zero only at initialisation
    return model.eval()


def _head_gap(model) -> float:
    """max |model logits - hidden @ lm_head.weight.T| on one short sequence."""
    ids = torch.tensor([[1, 5, 9, 14, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
        hidden = final_hidden_states(model, ids, torch.arange(ids.shape[1])[None])[0]
        plain = hidden @ model.get_output_embeddings().weight.T
    return (logits - plain).abs().max().item()


@pytest.mark.parametrize(
    "build, problem",
    [
        (_with_head_bias, "its lm_head has a bias"),
        (_softcapped, "its config sets final_logit_softcapping=0.5"),
        (_lora_on_head, "its lm_head carries a LoRA adapter"),
    ],
    ids=["head-bias", "softcapping", "lora-on-head"],
)
def test_models_whose_logits_are_not_the_plain_product_are_refused(tokenizer, build, problem):
    model = build(tokenizer)
    assert _head_gap(model) > 1e-3  # the refusal is warranted: the kernels would score other logits
    assert problem in output_head_problem(model)
    with pytest.raises(ValueError, match=problem):
        lm_head_weight(model)
    with pytest.raises(ValueError, match=f"model.teacher: {problem}"):
        check_output_heads(_llama(tokenizer), model, "fkl")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-all-linear"])
def test_plain_heads_pass_and_their_logits_are_the_product(tokenizer, lora):
    model = _llama(tokenizer)
    if lora:
        model = apply_lora(model, ModelConfig(lora_rank=2))  # all-linear leaves the output layer alone
    assert output_head_problem(model) is None
    assert _head_gap(model) < 1e-5
    check_output_heads(model, model, "fkl")


def test_heads_of_different_widths_are_refused_only_where_the_whole_vocabulary_is_compared(tokenizer):
    student, teacher = _llama(tokenizer), _llama(tokenizer)
    teacher.resize_token_embeddings(teacher.config.vocab_size + 64)
    for objective in ("fkl", "full_rkl", "topk_rkl", "jsd"):
        with pytest.raises(ValueError, match=f"{len(tokenizer) + 64} rows and the student's {len(tokenizer)}"):
            check_output_heads(student, teacher, objective)
    check_output_heads(student, teacher, "sampled_rkl")  # reads the teacher's log-prob of the sampled token only

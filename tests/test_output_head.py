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


def test_a_teacher_head_narrower_than_the_students_is_refused_only_where_the_whole_vocabulary_is_compared(tokenizer):
    student, teacher = _llama(tokenizer), _llama(tokenizer)
    student.resize_token_embeddings(student.config.vocab_size + 64)
    for objective in ("fkl", "full_rkl", "topk_rkl", "jsd"):
        with pytest.raises(ValueError, match=f"{len(tokenizer)} rows and the student's {len(tokenizer) + 64}"):
            check_output_heads(student, teacher, objective)
    check_output_heads(student, teacher, "sampled_rkl")  # reads the teacher's log-prob of the sampled token only
    check_output_heads(teacher, student, "fkl")  # the wider one as the teacher: see the test below


@pytest.mark.parametrize("objective", ["fkl", "full_rkl", "jsd"])
def test_a_wider_teacher_head_is_compared_over_the_students_rows_renormalized(objective):
    import kernels
    from opd_local.loss import teacher_rows_for
    from oracles import divergence64

    n, vocab, pad, h = 9, 50, 14, 8  # pad rows past every token, as a head padded to a multiple of 64 has
    hidden, weight = torch.randn(n, h, dtype=torch.float64), torch.randn(vocab, h, dtype=torch.float64)
    teacher_hidden, teacher_head = torch.randn(n, h + 2, dtype=torch.float64), torch.randn(vocab + pad, h + 2, dtype=torch.float64)
    _, _, divergence = kernels.linear_divergence_loss(
        hidden, weight, teacher_hidden, teacher_rows_for(weight, teacher_head), torch.zeros(n, dtype=torch.long),
        objective=objective, normalizer=1.0,
    )
    teacher_logits = teacher_hidden @ teacher_head.T
    renormalized = torch.log_softmax(teacher_logits[:, :vocab], -1)  # the padded rows' mass dropped
    torch.testing.assert_close(divergence, divergence64(objective, hidden @ weight.T, renormalized), atol=1e-12, rtol=1e-12)
    assert teacher_rows_for(teacher_head, weight) is weight  # a teacher no wider is taken whole


def test_a_run_trains_against_a_teacher_with_a_wider_head(tokenizer, micro_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from opd_local.loop import train
    from opd_local.metrics import read_metrics
    from test_loop import tiny_config

    padded = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    padded.resize_token_embeddings(padded.config.vocab_size + 64)
    padded.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    cfg = tiny_config(micro_model_dir, tmp_path / "run")
    cfg.model.teacher, cfg.loss.objective, cfg.run.steps, cfg.run.save_final = str(tmp_path / "teacher"), "fkl", 1, False
    (record,) = read_metrics(train(cfg))
    assert record["opd/active_tokens"] > 0 and 0 < record["opd/loss"] < float("inf")

"""The fused kernels compute logits from hidden @ lm_head.weight.T and the config's logit transform (Gemma 2's
tanh cap, Cohere's scale, Granite's divisor): such models score exactly as their own forward does; a model whose
logits are anything else is refused."""

from __future__ import annotations

import math

import pytest
import torch

from opd_local.config import ModelConfig
from opd_local.models import apply_lora, load_causal_lm
from opd_local.output_heads import check_output_heads, lm_head_weight, logit_transform, output_head_problem
from opd_local.hidden_states import final_hidden_states


def _llama(tokenizer, **changes):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **{"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, **changes},
    )
    return LlamaForCausalLM(config).eval()


def _with_head_bias(tokenizer):
    model = _llama(tokenizer)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(model.config.vocab_size))
    return model


def _lora_on_head(tokenizer):
    model = apply_lora(_llama(tokenizer), ModelConfig(lora_rank=2, lora_target_modules="q_proj,lm_head"))
    for name, param in model.named_parameters():
        if "lm_head" in name and "lora_B" in name:
            torch.nn.init.normal_(param)  # a trained adapter: B is zero only at initialisation
    return model.eval()


def _head_gap(model, scale: float = 1.0, softcap: float | None = None) -> float:
    """max |model logits - softcap(scale * hidden @ lm_head.weight.T)| on one short sequence."""
    ids = torch.tensor([[1, 5, 9, 14, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
        hidden = final_hidden_states(model, ids, torch.arange(ids.shape[1])[None])[0]
        product = scale * (hidden @ model.get_output_embeddings().weight.T)
        if softcap is not None:
            product = softcap * torch.tanh(product / softcap)
    return (logits - product).abs().max().item()


@pytest.mark.parametrize(
    "build, problem",
    [
        (_with_head_bias, "its lm_head has a bias"),
        (_lora_on_head, "its lm_head carries a LoRA adapter"),
    ],
    ids=["head-bias", "lora-on-head"],
)
def test_models_whose_logits_are_not_the_plain_product_are_refused(tokenizer, build, problem):
    model = build(tokenizer)
    assert _head_gap(model) > 1e-3  # the refusal is warranted: the kernels would score other logits
    assert problem in output_head_problem(model)
    with pytest.raises(ValueError, match=problem):
        lm_head_weight(model)
    with pytest.raises(ValueError, match=f"model.teacher: {problem}"):
        check_output_heads(_llama(tokenizer), model, "fkl")


# Tiny configs of the architectures whose logits are a transform of the product, and the (scale, softcap) it is.
def _granite(tokenizer, **size):
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(vocab_size=len(tokenizer), logits_scaling=8.0, **size))


def _cohere(tokenizer, **size):
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(vocab_size=len(tokenizer), logit_scale=0.25, tie_word_embeddings=False, **size))


def _gemma2(tokenizer, **size):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=len(tokenizer), final_logit_softcapping=30.0, tie_word_embeddings=False, **size)
    return Gemma2ForCausalLM(config)


TRANSFORMED = [(_granite, (0.125, None)), (_cohere, (0.25, None)), (_gemma2, (1.0, 30.0))]
SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             head_dim=8)


@pytest.mark.parametrize("build, transform", TRANSFORMED, ids=["granite", "cohere", "gemma2"])
def test_logit_transforms_are_read_from_the_config_as_the_model_applies_them(tokenizer, build, transform):
    torch.manual_seed(0)
    model = build(tokenizer, **SMALL).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 40.0)  # logits past the cap, so that it bends them
    assert output_head_problem(model) is None
    assert logit_transform(model) == transform
    assert _head_gap(model) > 1.0  # the plain product would be wrong
    assert _head_gap(model, *transform) < 1e-4  # the transform is what the model's forward applies


def test_a_transform_on_an_architecture_not_known_to_apply_it_is_refused(tokenizer):
    # transformers' LLaMA ignores a logit_scale in its config, MPT's own code applies it: the name alone cannot tell.
    model = _llama(tokenizer, logit_scale=4.0)
    problem = "its config sets logit_scale=4.0, a transform of the logits after the lm_head that opd-local does not know"
    assert problem in output_head_problem(model)
    with pytest.raises(ValueError, match=problem):
        logit_transform(model)
    with pytest.raises(ValueError, match=f"model.teacher: {problem}"):
        check_output_heads(_llama(tokenizer), model, "fkl")


def _save_tiny(build, path, tokenizer, head_std: float, seed: int) -> str:
    """A random-init 2-layer model of `build` with SmolLM2's vocabulary, saved as conftest.save_tiny_llama does."""
    torch.manual_seed(seed)
    model = build(
        tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, head_std)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# Head init: Granite's logits are z / 8, so a head 8 times wider than the tiny LLaMA's (0.2) gives them a std of
# about 2; Gemma 2's z of std ~30 at the cap of 30 puts most logits on the bent part of tanh, some near saturation.
TINY_TRANSFORMED = [(_granite, 1.6, (0.125, None)), (_gemma2, 4.0, (1.0, 30.0))]


@pytest.fixture(scope="module", params=TINY_TRANSFORMED, ids=["granite", "gemma2"])
def transformed_model(request, tmp_path_factory, tokenizer):
    build, head_std, transform = request.param
    path = _save_tiny(build, tmp_path_factory.mktemp(build.__name__.strip("_")), tokenizer, head_std, seed=5)
    model = load_causal_lm(path, ModelConfig(), torch.float32, torch.device("cpu")).eval()
    return model, transform


def _sequences(tokenizer, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for text, length in [("2+2?", 7), ("Name a colour.", 12), ("Count to three.", 5)]:
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"])
        completions.append(torch.randint(0, len(tokenizer), (length,), generator=g).tolist())
    return prompts, completions


def _hf_logprobs(model, prompt, completion, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(model(ids).logits / T) of each completion token: the model's own forward, transform included."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)
    return logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scores_equal_the_models_own_logits(tokenizer, transformed_model, temperature):
    from opd_local.scoring import score_completions

    model, transform = transformed_model
    prompts, completions = _sequences(tokenizer)
    # One sequence per forward: this checks the head, not the packing of several sequences in one row.
    budget = max(len(p) + len(c) for p, c in zip(prompts, completions))
    scores = score_completions(model, prompts, completions, micro_batch_tokens=budget, temperature=temperature)
    gaps = []
    for prompt, completion, got in zip(prompts, completions, scores.logprobs):
        expected = _hf_logprobs(model, prompt, completion, temperature)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        hidden = final_hidden_states(model, torch.tensor([prompt + completion]), torch.arange(len(prompt + completion))[None])
        plain = torch.log_softmax(hidden[0, len(prompt) - 1 : -1] @ lm_head_weight(model).T / temperature, -1)
        gaps.append((plain.gather(1, torch.tensor(completion)[:, None]).squeeze(1) - expected).abs().max())
    assert max(gaps) > 0.1  # without the transform the scores would be far off


@pytest.mark.parametrize("objective", ["sampled_rkl", "fkl"])
def test_the_loss_reads_each_sides_transform(tokenizer, tmp_path, objective):
    """A Granite student against a Gemma 2 teacher: student_lp and, for fkl, the divergence are the models' own."""
    from opd_local.config import LossConfig
    from opd_local.loss import opd_micro_batch_loss
    from opd_local.packing import pack_sequences

    student = load_causal_lm(_save_tiny(_granite, tmp_path / "s", tokenizer, 1.6, seed=6), ModelConfig(), torch.float32,
                             torch.device("cpu"))
    teacher = load_causal_lm(_save_tiny(_gemma2, tmp_path / "t", tokenizer, 4.0, seed=7), ModelConfig(), torch.float32,
                             torch.device("cpu")).eval()
    prompts, completions = _sequences(tokenizer, seed=1)
    batch = pack_sequences(prompts, completions)
    n = float(batch.num_active)
    expected_lp = torch.cat([_hf_logprobs(student, p, c) for p, c in zip(prompts, completions)])
    with torch.no_grad():
        teacher_hidden = torch.cat([
            final_hidden_states(teacher, torch.tensor([p + c]), torch.arange(len(p + c))[None])[0, len(p) - 1 : -1]
            for p, c in zip(prompts, completions)
        ])
    loss, student_lp = opd_micro_batch_loss(
        student, batch, expected_lp, expected_lp, LossConfig(objective=objective), n, 1.0, teacher_hidden=teacher_hidden,
        teacher_head=lm_head_weight(teacher).detach(), teacher_logit_transform=logit_transform(teacher),
    )
    torch.testing.assert_close(student_lp.detach(), expected_lp, atol=1e-5, rtol=0)
    if objective == "fkl":
        kl = []
        for p, c in zip(prompts, completions):
            ids = torch.tensor([p + c])
            with torch.no_grad():
                logp_s = torch.log_softmax(student(input_ids=ids).logits[0, len(p) - 1 : -1].double(), -1)
                logp_t = torch.log_softmax(teacher(input_ids=ids).logits[0, len(p) - 1 : -1].double(), -1)
            kl.append((logp_t.exp() * (logp_t - logp_s)).sum(-1))
        torch.testing.assert_close(loss.detach().double(), torch.cat(kl).sum() / n, atol=1e-6, rtol=1e-5)


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


@pytest.mark.parametrize("objective", ["sampled_rkl", "fkl"])
def test_a_teacher_narrower_than_the_tokenizer_is_refused_whatever_the_objective(tokenizer, objective):
    """It could not read the prompts' token ids, nor score most of what the student samples."""
    from opd_local.output_heads import check_teacher_vocabulary

    student, teacher = _llama(tokenizer), _llama(tokenizer, vocab_size=1000)
    message = f"model.teacher: its lm_head has 1000 rows, fewer than the tokenizer's {len(tokenizer)} tokens"
    with pytest.raises(ValueError, match=message):
        check_output_heads(student, teacher, objective, len(tokenizer))
    with pytest.raises(ValueError, match=f"vocab_size gives it 1000 rows, fewer than the tokenizer's {len(tokenizer)}"):
        check_teacher_vocabulary(len(tokenizer), student.config, teacher.config)  # from the configs, before anything loads
    # Input embeddings narrower than the head: the prompt's ids go through them.
    teacher = _llama(tokenizer)
    teacher.set_input_embeddings(torch.nn.Embedding(1000, 16))
    with pytest.raises(ValueError, match="its input embeddings have 1000 rows"):
        check_output_heads(student, teacher, "sampled_rkl", len(tokenizer))


def test_a_teacher_narrower_than_the_student_but_covering_the_tokenizer_passes_for_sampled_rkl(tokenizer):
    from opd_local.output_heads import check_teacher_vocabulary

    student, teacher = _llama(tokenizer), _llama(tokenizer)
    student.resize_token_embeddings(len(tokenizer) + 64)
    check_output_heads(student, teacher, "sampled_rkl", len(tokenizer))
    check_teacher_vocabulary(len(tokenizer), student.config, teacher.config)
    # A teacher no narrower than the student covers whatever the student reads or samples, whatever the tokenizer.
    check_teacher_vocabulary(len(tokenizer) + 10, teacher.config, teacher.config)


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


def test_a_sampled_rkl_run_trains_against_a_teacher_with_only_the_tokenizers_rows(tokenizer, micro_model_dir, tmp_path):
    """The student's head padded 64 rows past the tokenizer, the teacher's not (docs/refusals.md: sampled_rkl accepts it)."""
    from transformers import AutoModelForCausalLM

    from opd_local.loop import train
    from opd_local.metrics import read_metrics
    from test_loop import tiny_config

    padded = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    padded.resize_token_embeddings(padded.config.vocab_size + 64)
    padded.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    cfg = tiny_config(str(tmp_path / "student"), tmp_path / "run")
    cfg.model.teacher, cfg.loss.objective, cfg.run.steps, cfg.run.save_final = micro_model_dir, "sampled_rkl", 1, False
    (record,) = read_metrics(train(cfg))
    assert record["opd/active_tokens"] > 0 and math.isfinite(record["opd/loss"])
    # A completion holding a padding row, which the student samples rarely, is dropped (tests/test_teacher.py).
    assert "rollout/dropped_past_teacher_rows" in record

"""What the fused kernels need of a model's output head: logits that are a transform of hidden @ lm_head.weight.T,
and a teacher with a row for every token the student reads and samples (docs/design.md, "Interfaces", Models)."""

from __future__ import annotations

import math

import torch

# Config fields that transform z = hidden @ lm_head.weight.T into the logits, each with its identity value and,
# by config.model_type, how that architecture's transformers forward applies it (modeling_<type>.py; multimodal
# models read it from config.get_text_config()). The fused kernels apply the same transform (`logit_transform`).
# A field set on any other model type is refused: one name means different things (HyperCLOVAX multiplies by
# logits_scaling where Granite divides; transformers' MPT ignores its logit_scale and Gemma 3's multimodal
# model its text config's cap, which vLLM's Gemma 3 applies).
_SOFTCAPPED = (
    "gemma2", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "gemma4_unified",
    "gemma4_unified_text", "nanochat", "vaultgemma",
)
_LOGIT_SCALED = ("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text")
_LOGIT_DIVIDED = (
    "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "granitemoehybrid", "granite4_vision",
    "minicpm3",  # divides the hidden states: the same for a head without bias
)
LOGIT_TRANSFORMS = {
    # cap * tanh(z / cap)
    "final_logit_softcapping": (None, dict.fromkeys(_SOFTCAPPED, "softcap")),
    # z * s
    "logit_scale": (1.0, dict.fromkeys(_LOGIT_SCALED, "multiply")),
    # z / s, or z * s
    "logits_scaling": (
        1.0, {**dict.fromkeys(_LOGIT_DIVIDED, "divide"), "hyperclovax": "multiply", "hyperclovax_vision_v2": "multiply"}
    ),
}


def _read_logit_transform(model) -> tuple[float, float | None, str | None]:
    """(scale, softcap, problem): the logits are softcap(scale * z), or `problem` says why that is not known."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", None)
    scale, softcap = 1.0, None
    for name, (plain, appliers) in LOGIT_TRANSFORMS.items():
        value = getattr(text, name, getattr(config, name, plain))
        if value is None or value == plain:
            continue
        how = appliers.get(model_type)
        if how is None:
            return 1.0, None, (
                f"its config sets {name}={value!r}, a transform of the logits after the lm_head that opd-local does not "
                f"know how model type {model_type!r} applies"
            )
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            return 1.0, None, f"its config sets {name}={value!r}; a logit transform must be a finite number > 0"
        if how == "softcap":
            softcap = float(value)
        else:
            scale *= float(value) if how == "multiply" else 1.0 / float(value)
    return scale, softcap, None


def logit_transform(model) -> tuple[float, float | None]:
    """(scale, softcap) such that the model's logits are softcap(scale * hidden @ lm_head.weight.T),
    softcap(u) = cap * tanh(u / cap), or softcap None for none: what each `kernels` op takes as `logit_scale`
    and `softcap`. (1.0, None) for the plain product. Refuses a transform it cannot tell (`output_head_problem`)."""
    scale, softcap, problem = _read_logit_transform(model)
    if problem is not None:
        raise ValueError(f"{type(model).__name__}: {problem}")
    return scale, softcap


def output_head_problem(model) -> str | None:
    """Why the fused kernels cannot compute this model's logits from its lm_head weight (and `logit_transform`), or None."""
    head = model.get_output_embeddings()
    if head is None:
        return "it has no output embeddings (lm_head)"
    if hasattr(head, "base_layer"):
        return "its lm_head carries a LoRA adapter, which the fused loss leaves out (drop lm_head from model.lora_target_modules)"
    if getattr(head, "bias", None) is not None:
        return "its lm_head has a bias"
    return _read_logit_transform(model)[2]


def lm_head_weight(model) -> torch.Tensor:
    """The output embedding `W` such that the model's logits are `hidden @ W.T`, up to `logit_transform`; refuses a
    model where they are not."""
    check_output_head(model, type(model).__name__)
    return model.get_output_embeddings().weight


def check_output_head(model, setting: str) -> None:
    """Refuse, naming `setting`, a model whose logits the fused kernels cannot compute."""
    problem = output_head_problem(model)
    if problem is not None:
        raise ValueError(f"{setting}: {problem}; opd-local computes logits as hidden @ lm_head.weight.T")


def token_rows(model) -> int:
    """How many token ids the model can read and score: the rows of its input embeddings and of its lm_head, the fewer."""
    rows = model.get_output_embeddings().weight.shape[0]
    embeddings = model.get_input_embeddings()
    return min(rows, embeddings.weight.shape[0]) if embeddings is not None else rows


def _vocabulary_problem(teacher_rows: int, student_rows: int, tokenizer_size: int, what: str) -> str | None:
    """A teacher narrower than the student must still have a row for every token of the tokenizer: the prompts
    hold any of them and the student samples them all. (One no narrower than the student covers what the
    student reads and samples, whatever the tokenizer.)"""
    if teacher_rows >= student_rows or teacher_rows >= tokenizer_size:
        return None
    return (
        f"model.teacher: {what} {teacher_rows} rows, fewer than the tokenizer's {tokenizer_size} tokens and the student's "
        f"{student_rows} rows; the teacher reads the prompt and scores every token the student samples, so it needs a row for "
        "each token id, whatever loss.objective. Use a teacher whose vocabulary covers the tokenizer's"
    )


def check_teacher_vocabulary(tokenizer_size: int, student_config, teacher_config) -> None:
    """`_vocabulary_problem` from the models' `PretrainedConfig`s (their vocab_size), before anything loads.
    `check_output_heads` makes the same check on the loaded weights."""
    sizes = []
    for config in (student_config, teacher_config):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        sizes.append(getattr(text, "vocab_size", None))
    if all(isinstance(size, int) for size in sizes):
        problem = _vocabulary_problem(sizes[1], sizes[0], tokenizer_size, "its config's vocab_size gives it")
        if problem:
            raise ValueError(problem)


def check_output_heads(student, teacher, objective: str, tokenizer_size: int | None = None) -> None:
    """Refuse before step 0 a student or teacher whose logits the fused kernels cannot compute, a teacher
    narrower than the student and than the tokenizer (`_vocabulary_problem`), and, for the full-vocabulary
    objectives, a teacher head narrower than the student's (a vocabulary padded less)."""
    heads = {}
    for role, setting, model in (("student", "model.student", student), ("teacher", "model.teacher", teacher)):
        check_output_head(model, setting)
        heads[role] = model.get_output_embeddings().weight.shape[0]
    if tokenizer_size is not None:
        rows = token_rows(teacher)
        what = "its lm_head has" if rows == heads["teacher"] else "its input embeddings have"
        problem = _vocabulary_problem(rows, heads["student"], tokenizer_size, what)
        if problem:
            raise ValueError(problem)
    # A wider teacher head is fine: its extra rows are padding past every token (`loss.teacher_rows_for`).
    # A narrower one that covers the tokenizer is fine for sampled_rkl: a completion holding one of the
    # student's padding rows, which the teacher has no row for, is dropped (`rollouts.drop_past_teacher_rows`).
    if objective != "sampled_rkl" and heads["teacher"] < heads["student"]:
        raise ValueError(
            f"model.teacher: its lm_head has {heads['teacher']} rows and the student's {heads['student']} (the same tokenizer, "
            f"padded differently); loss.objective={objective} needs a teacher distribution over every row the student "
            "can sample. Use loss.objective=sampled_rkl, which reads the teacher's log-prob of the sampled token only, or "
            "a teacher head at least as wide as the student's"
        )

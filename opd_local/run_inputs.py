"""What a run reads before anything trains: model locations, the shared tokenizer and the prompt groups.

Shared by training and stand-alone evaluation; everything that can refuse a run on bad input
(unknown model, tokenizer mismatch, malformed or over-long rows) does so here, before step 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd_local.config import Config, ModelConfig
from opd_local.data import PromptGroup, load_train_and_heldout, tokenize_groups
from opd_local.loss import check_loss_config
from opd_local.models import check_same_tokenizer, load_tokenizer, resolve_model_path


@dataclass
class RunInputs:
    student_path: str
    teacher_path: str
    tokenizer: object
    train_groups: list[PromptGroup]
    heldout_groups: list[PromptGroup]
    overlong_rows: list[str]  # training rows dropped as over-long (with data.drop_overlong)
    teacher_weights: str  # initial, separate or base_adapter_off (resolved from auto)


def resolve_teacher_weights(model_cfg: ModelConfig) -> str:
    """Which weights the teacher runs, with `auto` resolved; contradictory settings are refused."""
    choice, has_teacher, lora = model_cfg.teacher_weights, bool(model_cfg.teacher), model_cfg.lora_rank > 0
    if choice == "auto":
        return "separate" if has_teacher else "base_adapter_off" if lora else "initial"
    if choice == "separate" and not has_teacher:
        raise ValueError("model.teacher_weights=separate needs model.teacher (a Hugging Face id or directory)")
    if choice in ("initial", "base_adapter_off") and has_teacher:
        raise ValueError(f"model.teacher_weights={choice} uses the student's weights, but model.teacher is set")
    if choice == "base_adapter_off" and not lora:
        raise ValueError("model.teacher_weights=base_adapter_off needs a LoRA student (model.lora_rank > 0)")
    if choice not in ("initial", "separate", "base_adapter_off"):
        raise ValueError(f"model.teacher_weights={choice!r}; choose auto, initial, separate or base_adapter_off")
    return choice


def load_run_inputs(cfg: Config) -> RunInputs:
    # Config checks first: they cost nothing, unlike the loads below.
    if cfg.model.teacher_context not in ("privileged", "plain"):
        raise ValueError(f"model.teacher_context={cfg.model.teacher_context!r}; choose privileged or plain")
    teacher_weights = resolve_teacher_weights(cfg.model)
    check_loss_config(cfg.loss)
    student_path = resolve_model_path(cfg.model.student, cfg.model)
    teacher_path = resolve_model_path(cfg.model.teacher or cfg.model.student, cfg.model)
    tokenizer = load_tokenizer(student_path, cfg.model)
    check_same_tokenizer(tokenizer, load_tokenizer(teacher_path, cfg.model))
    train_rows, heldout_rows = load_train_and_heldout(cfg.data)
    train_groups, overlong = tokenize_groups(train_rows, tokenizer, cfg.data.max_prompt_tokens, cfg.data.drop_overlong)
    heldout_groups, _ = tokenize_groups(heldout_rows, tokenizer, cfg.data.max_prompt_tokens, cfg.data.drop_overlong)
    return RunInputs(student_path, teacher_path, tokenizer, train_groups, heldout_groups, overlong, teacher_weights)

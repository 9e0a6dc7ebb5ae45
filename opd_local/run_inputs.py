"""What a run reads before anything trains: model locations, the shared tokenizer and the prompt groups.

Shared by training and stand-alone evaluation; everything that can refuse a run on bad input
(unknown model, tokenizer mismatch, malformed or over-long rows) does so here, before step 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd_local.config import Config
from opd_local.data import PromptGroup, load_train_and_heldout, tokenize_groups
from opd_local.models import check_same_tokenizer, load_tokenizer, resolve_model_path


@dataclass
class RunInputs:
    student_path: str
    teacher_path: str
    tokenizer: object
    train_groups: list[PromptGroup]
    heldout_groups: list[PromptGroup]
    overlong_rows: list[str]  # training rows dropped as over-long (with data.drop_overlong)


def load_run_inputs(cfg: Config) -> RunInputs:
    student_path = resolve_model_path(cfg.model.student, cfg.model)
    teacher_path = resolve_model_path(cfg.model.teacher or cfg.model.student, cfg.model)
    tokenizer = load_tokenizer(student_path, cfg.model)
    check_same_tokenizer(tokenizer, load_tokenizer(teacher_path, cfg.model))
    train_rows, heldout_rows = load_train_and_heldout(cfg.data)
    train_groups, overlong = tokenize_groups(train_rows, tokenizer, cfg.data.max_prompt_tokens, cfg.data.drop_overlong)
    heldout_groups, _ = tokenize_groups(heldout_rows, tokenizer, cfg.data.max_prompt_tokens, cfg.data.drop_overlong)
    if cfg.model.teacher_context not in ("privileged", "plain"):
        raise ValueError(f"model.teacher_context={cfg.model.teacher_context!r}; choose privileged or plain")
    if cfg.model.teacher_context == "plain":
        # The control: the teacher scores (and writes its eval traces) from the student's own prompt,
        # so any gain over it is what the privileged context adds.
        for group in train_groups + heldout_groups:
            group.teacher_prompt_ids = list(group.student_prompt_ids)
    return RunInputs(student_path, teacher_path, tokenizer, train_groups, heldout_groups, overlong)

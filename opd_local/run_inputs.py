"""What a run reads before anything trains: model locations, the shared tokenizer and the prompt groups.

Shared by training and stand-alone evaluation; everything that can refuse a run on bad input
(unknown model, tokenizer mismatch, malformed or over-long rows) does so here, before step 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opd_local.config import Config
from opd_local.data import (
    PromptGroup,
    check_rendered_adds_privileged,
    count_duplicates,
    load_train_and_heldout,
    tokenize_groups,
)
from opd_local.models import check_same_tokenizer, load_tokenizer, resolve_model_path
from opd_local.preflight import Resolved, check_model_configs
from opd_local.rows import check_adds_privileged
from opd_local.safetensors_files import check_model_weight_files


@dataclass
class RunInputs:
    student_path: str
    teacher_path: str
    tokenizer: object
    train_groups: list[PromptGroup]
    heldout_groups: list[PromptGroup]
    resolved: Resolved  # the settings' auto values, settled once (`preflight.resolve`)
    counts: dict[str, int]  # rows kept, dropped and duplicated: logged with step 0

    def summary(self) -> str:
        c = self.counts
        return (
            f"data: {c['data/train_rows']} training rows ({c['data/duplicate_train_rows']} duplicates, "
            f"{c['data/overlong_rows_dropped']} dropped as over-long), {c['data/heldout_rows']} held-out rows "
            f"({c['data/duplicate_heldout_rows']} duplicates, {c['data/overlong_heldout_rows_dropped']} dropped as over-long)"
        )




def check_model_source(name: str, setting: str) -> None:
    """A model named by a local path must be a directory holding a Hugging Face model.

    Without this, a path that does not exist reaches the hub client, whose error is about repo ids.
    Names that are not paths (`org/name`) are hub ids and are left to the hub.
    """
    if not name or name.startswith("embedded:"):
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{setting}={name!r} is a file; give the directory that holds config.json and the weights")
        if not (path / "config.json").is_file():
            what = "is an empty folder" if not any(path.iterdir()) else "has no config.json"
            raise ValueError(f"{setting}={name!r} {what}; it is not a Hugging Face model directory")
    elif name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ValueError(f"{setting}={name!r}: no such directory")


# What a Hugging Face tokenizer is saved as: the fast tokenizer, a SentencePiece model, or a BPE vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _tokenizer(path: str, cfg: Config, setting: str, renders_prompts: bool):
    try:
        tokenizer = load_tokenizer(path, cfg.model)
    # OSError: the hub client's "not a valid model identifier" and friends; ValueError: a folder without
    # tokenizer files, which transformers reports as a missing converter package.
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        folder = Path(path).expanduser()
        if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            reason = f"the folder holds none of {', '.join(TOKENIZER_FILES)}; transformers says: {reason}"
        raise ValueError(f"{setting}={path!r}: cannot load its tokenizer ({reason})") from err
    # The student's tokenizer renders both prompts; a teacher's need only read the same ids.
    if renders_prompts and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{setting}={path!r}: its tokenizer has no chat template, and every prompt is chat messages; "
            "use an instruct/chat model or add a chat_template to its tokenizer_config.json"
        )
    return tokenizer


def _model_config(path: str, cfg: Config):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)


def check_probe_text(tokenizer, probe_text: str) -> None:
    """The parity probe scores every token after the first, so it needs two at least."""
    count = len(tokenizer(probe_text)["input_ids"])
    if count < 2:
        raise ValueError(f"sync.probe_text={probe_text!r} is {count} token(s); the parity probe needs at least 2")


def load_run_inputs(cfg: Config, resolved: Resolved) -> RunInputs:
    """For a config `preflight.check_config` passed: the cheap checks of the sources first, then the loads."""
    for setting in ("student", "teacher"):
        check_model_source(getattr(cfg.model, setting), f"model.{setting}")
    student_path = resolve_model_path(cfg.model.student, cfg.model)
    teacher_path = resolve_model_path(cfg.model.teacher or cfg.model.student, cfg.model)
    check_model_weight_files(student_path, "model.student")
    check_model_weight_files(teacher_path, "model.teacher" if cfg.model.teacher else "model.student")
    tokenizer = _tokenizer(student_path, cfg, "model.student", renders_prompts=True)
    teacher_setting = "model.teacher" if cfg.model.teacher else "model.student"
    check_same_tokenizer(tokenizer, _tokenizer(teacher_path, cfg, teacher_setting, renders_prompts=False))
    check_probe_text(tokenizer, cfg.sync.probe_text)
    student_config, teacher_config = _model_config(student_path, cfg), _model_config(teacher_path, cfg)
    check_model_configs(cfg, student_config, teacher_config, len(tokenizer))
    train_rows, heldout_rows = load_train_and_heldout(cfg.data, resolved.max_train_rows)
    if cfg.model.teacher_context == "privileged":
        for row in train_rows + heldout_rows:
            check_adds_privileged(row)
    train_groups, overlong = tokenize_groups(train_rows, tokenizer, cfg.data.max_prompt_tokens, cfg.data.drop_overlong)
    heldout_groups, heldout_overlong = tokenize_groups(heldout_rows, tokenizer, cfg.data.max_prompt_tokens, cfg.data.drop_overlong)
    if cfg.model.teacher_context == "privileged":
        # The same check on the ids: a chat template that skips a turn can render different messages alike.
        for group in train_groups + heldout_groups:
            check_rendered_adds_privileged(group, tokenizer)
    counts = {
        "data/train_rows": len(train_groups),
        "data/heldout_rows": len(heldout_groups),
        "data/overlong_rows_dropped": len(overlong),
        "data/overlong_heldout_rows_dropped": len(heldout_overlong),
        "data/duplicate_train_rows": count_duplicates(train_rows),
        "data/duplicate_heldout_rows": count_duplicates(heldout_rows),
    }
    return RunInputs(student_path, teacher_path, tokenizer, train_groups, heldout_groups, resolved, counts)

"""A privileged row: what the student sees, what the teacher sees besides, the expected answer, and
the checks every row passes whatever task it comes from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from opd_local.answers import THOUSANDS_COMMA, extract_final_answer, final_line


class DataError(ValueError):
    """A row (or a source) that cannot be used; the message names the row id and the field."""


@dataclass(frozen=True)
class PrivilegedRow:
    row_id: str  # "bundled:gsm8k/train#17" or "path/to/x.jsonl#3" (0-based row index)
    student_messages: tuple[dict, ...]  # the problem + answer-format instruction
    teacher_messages: tuple[dict, ...]  # the same + privileged worked solution + pinned final line
    answer: str | None  # normalized expected final answer
    privileged: str | None  # text that must never reach the student


def require_string(record: Mapping, key: str, row_id: str, field: str | None = None) -> str:
    field = field or key
    if record.get(key) is None:
        raise DataError(f"{row_id}: field {field!r} is missing")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{row_id}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{row_id}: field {field!r} is empty")
    return value


def plain_words(text: str) -> str:
    """Lower case, thousands commas dropped, punctuation as spaces, whitespace collapsed: copies of a
    text that differ only in those compare equal."""
    return " ".join(re.sub(r"[^\w]+", " ", THOUSANDS_COMMA.sub("", text).lower()).split())


def _stated_answer(answer: str) -> re.Pattern:
    """`answer` given as an answer ("the answer is 42", "Answer: 42", "#### 42"), not merely a number
    that the problem happens to contain; 420 and 42.5 are other numbers."""
    return re.compile(
        r"(?:\b(?:final answer|answer|result)\s*(?:is|equals|=|:)|####)\s*[*`$]*\s*"
        + re.escape(answer.lower())
        + r"(?![\w]|[.,]\d)"
    )


def check_no_privileged_leak(row: PrivilegedRow) -> None:
    """Raise DataError if the privileged text or the final answer reaches a student message.

    The privileged text is compared as plain words, so a copy with its case, punctuation or line
    breaks changed still counts; the answer counts as a `Final: <answer>` line or stated as the answer.
    """
    privileged = plain_words(row.privileged or "")
    for i, message in enumerate(row.student_messages):
        content = message["content"]
        where = f"{row.row_id}: field 'messages[{i}].content'"
        if privileged and f" {privileged} " in f" {plain_words(content)} ":
            raise DataError(f"{where} contains the privileged text")
        if row.answer is None:
            continue
        if any(extract_final_answer(line) == row.answer for line in content.splitlines()):
            raise DataError(f"{where} contains the pinned line {final_line(row.answer)!r}")
        prose = " ".join(THOUSANDS_COMMA.sub("", content).lower().split())
        if _stated_answer(row.answer).search(prose):
            raise DataError(f"{where} states the final answer {row.answer!r}")


def check_adds_privileged(row: PrivilegedRow) -> None:
    """Raise DataError if the teacher prompt is the student prompt (as plain words): nothing privileged to learn from.

    The rendered prompts get the same check once tokenized (`data.check_rendered_adds_privileged`)."""
    if plain_words(_text(row.teacher_messages)) == plain_words(_text(row.student_messages)):
        raise DataError(
            f"{row.row_id}: field 'teacher_messages' adds nothing to 'messages'; with model.teacher_context=privileged "
            "the teacher prompt must hold what the student does not see (or use model.teacher_context=plain)"
        )


def _text(messages: Sequence[dict]) -> str:
    return "\n".join(m["content"] for m in messages)

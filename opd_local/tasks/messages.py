"""Rows already written as chat messages: {messages, teacher_messages, answer?, privileged?}.

`messages` is the student's prompt, `teacher_messages` the teacher's (holding what the student does
not see); `answer`, when given, is graded by the `Final:` convention; `privileged`, when given, is
the text the leak check keeps out of the student's messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opd_local.answers import normalize_answer
from opd_local.rows import (
    DataError,
    PrivilegedRow,
    check_no_privileged_leak,
    require_string,
)

NAME = "messages"
COLUMNS = ("messages", "teacher_messages")
FIELDS = ("messages", "teacher_messages", "answer", "privileged")
ROLES = ("system", "user", "assistant")


def _messages(record: Mapping, field: str, row_id: str) -> tuple[dict, ...]:
    value = record.get(field)
    if value is None:
        raise DataError(f"{row_id}: field {field!r} is missing")
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise DataError(f"{row_id}: field {field!r} must be a non-empty list of {{role, content}} messages")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise DataError(f"{row_id}: field {where!r} must be a {{role, content}} mapping")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{row_id}: field '{where}.role' is {role!r}; expected one of {ROLES}")
        content = require_string(message, "content", row_id, f"{where}.content")
        # Only role/content: arrow's schema unification adds null keys that templates would render.
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise DataError(f"{row_id}: field '{field}[{len(messages) - 1}].role' must be 'user' (the prompt ends on the user turn)")
    return tuple(messages)


def to_row(record: Mapping, row_id: str) -> PrivilegedRow:
    """A generic row {messages, teacher_messages, answer?, privileged?} as a privileged pair."""
    student_messages = _messages(record, "messages", row_id)
    teacher_messages = _messages(record, "teacher_messages", row_id)
    answer = None
    if record.get("answer") is not None:
        answer = normalize_answer(require_string(record, "answer", row_id))
        if not answer:  # every reply would be graded wrong
            raise DataError(f"{row_id}: field 'answer' is {record['answer']!r}, which holds no answer once normalized")
    privileged = None
    if record.get("privileged") is not None:
        privileged = require_string(record, "privileged", row_id)
    row = PrivilegedRow(row_id, student_messages, teacher_messages, answer, privileged)
    check_no_privileged_leak(row)
    return row

"""GSM8K: grade-school word problems whose answers hold the worked solution and end in `#### N`.

The student sees the problem and the answer-format instruction; the teacher sees the same plus the
worked solution, pinned to its `Final: <answer>` line (docs/design.md, "The default model and data").
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from opd_local.answers import final_line, normalize_answer
from opd_local.rows import (
    DataError,
    PrivilegedRow,
    check_no_privileged_leak,
    require_string,
)

NAME = "gsm8k"
COLUMNS = ("question", "answer")  # what a source's columns must include to be read as this task
FIELDS = COLUMNS  # the fields a row reads

# The format instruction comes before the problem: SmolLM2-135M then ends 17% of its greedy replies
# with a `Final:` line, against 0% with the same instruction after the problem.
STUDENT_INSTRUCTION = "Solve the problem step by step, then write the last line as `Final: <number>`."

_CALC_ANNOTATION = re.compile(r"<<[^<>]*>>")


def to_row(record: Mapping, row_id: str) -> PrivilegedRow:
    """A GSM8K record {question, answer: "steps <<calc>> ...\\n#### N"} as a privileged pair."""
    question = require_string(record, "question", row_id).strip()
    raw_answer = require_string(record, "answer", row_id)
    if "#### " not in raw_answer:
        raise DataError(f"{row_id}: field 'answer' has no '#### <final answer>' marker")
    solution, _, final = raw_answer.rpartition("#### ")
    answer = normalize_answer(final)
    if not answer:
        raise DataError(f"{row_id}: field 'answer' has nothing after '#### '")
    # The <<48/2=24>> calculator annotations are GSM8K tooling, not prose a model should imitate.
    solution = _CALC_ANNOTATION.sub("", solution).strip()

    student_content = f"{STUDENT_INSTRUCTION}\n\nProblem: {question}"
    # Small teachers follow this layout best: the solution is shown as a finished answer that ends in
    # the pinned line, then they are asked to rewrite it (62% correct `Final:` lines for
    # SmolLM2-135M, against 0% with the solution fenced off as a "reference only" block).
    teacher_content = (
        f"{student_content}\n\n"
        f"A correct worked solution:\n{solution}\n{final_line(answer)}\n\n"
        f"Rewrite this solution step by step in your own words, then end with exactly one line "
        f"`{final_line(answer)}`."
    )
    # No system message: the tokenizer's chat template adds its own default, identically for both.
    row = PrivilegedRow(
        row_id=row_id,
        student_messages=({"role": "user", "content": student_content},),
        teacher_messages=({"role": "user", "content": teacher_content},),
        answer=answer,
        privileged=solution or None,
    )
    check_no_privileged_leak(row)
    return row

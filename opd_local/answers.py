"""The answer convention rows are graded by: the last `Final: <answer>` line of a reply.

Every task's rows follow it: the student is asked for that line, the privileged prompt pins it, the
leak check looks for it in student prompts, and evaluation finds its span and matches its answer.
"""

from __future__ import annotations

import re

# A "Final:" line, tolerating the markdown small models wrap around it ("**Final:** 42", "`Final: 42`").
FINAL_LINE = re.compile(r"^[ \t*`_]*Final[ \t]*:(.*)$", re.MULTILINE)
THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def normalize_answer(text: str) -> str:
    """Collapse whitespace, drop trailing ".", and drop thousands commas ("1,000" -> "1000").

    The comma rule is GSM8K's convention ("#### 1,080"); it also applies to model output so that
    "Final: 1,080" matches "1080".
    """
    text = " ".join(text.split()).rstrip(".").rstrip()
    return THOUSANDS_COMMA.sub("", text)


def _strip_markup(text: str) -> str:
    # Small models wrap answers in markdown ("**42**.", "`42`"); peel until stable.
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip("*`").rstrip(".")
    return text


def extract_final_answer(text: str) -> str | None:
    """The normalized answer on the last line of the form `Final: <answer>`, or None if there is none."""
    for match in reversed(list(FINAL_LINE.finditer(text))):
        answer = normalize_answer(_strip_markup(match.group(1)))
        if answer:
            return answer
    return None


def answers_match(completion_text: str, answer: str | None) -> bool:
    """Exact match of the completion's `Final:` answer with the row's, both normalized."""
    predicted = extract_final_answer(completion_text)
    return answer is not None and predicted is not None and predicted == normalize_answer(answer)


def final_line(answer: str) -> str:
    """The line a teacher prompt pins its worked solution's end to."""
    return f"Final: {answer}"

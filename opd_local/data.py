"""Rows with a privileged teacher prompt: read from a source, checked, and tokenized into prompt groups.

Step 1 of the OPD step. A source is the bundled GSM8K subset, a local json/jsonl/parquet file or
directory, or a hub id; its records become rows through their task (`opd_local/tasks`), and each
row becomes a student prompt and a teacher prompt. The loop draws them through a seeded GroupStream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from opd_local.config import BUNDLED_GSM8K, DataConfig
from opd_local.rows import DataError, PrivilegedRow, plain_words
from opd_local.tasks import TASKS

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class PromptGroup:
    row: PrivilegedRow
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]  # the privileged prompt

    def training_teacher_prompt(self, teacher_context: str) -> list[int]:
        """What the teacher sees when it scores a rollout: the privileged prompt, or (plain) the student's own.

        Evaluation always uses the privileged prompt, so that plain and privileged runs are measured
        against the same teacher traces.
        """
        return self.student_prompt_ids if teacher_context == "plain" else self.teacher_prompt_ids


# ---------------------------------------------------------------- sources


def _detect_format(columns: Sequence[str], source: str) -> str:
    found = set(columns)
    for name, task in TASKS.items():
        if set(task.COLUMNS) <= found:
            return name
    expected = " or ".join(f"{name} ({', '.join(task.COLUMNS)})" for name, task in TASKS.items())
    raise DataError(f"{source}: cannot tell the row format from columns {sorted(found)}; expected either {expected}")


def _bundled_records(source: str, split: str) -> tuple[list[dict], str]:
    name = source.removeprefix("bundled:")
    files = {"train": "train.jsonl", "test": "heldout.jsonl", "heldout": "heldout.jsonl"}
    if source != BUNDLED_GSM8K or split not in files:
        raise DataError(f"{source}: unknown bundled data or split {split!r}; bundled:gsm8k has splits {sorted(files)}")
    tag = f"{source}/{files[split].removesuffix('.jsonl')}"
    text = (resources.files("opd_local") / "bundled" / name / files[split]).read_text(encoding="utf-8")
    records = []
    for i, line in enumerate(text.splitlines()):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{tag}#{i}: not valid JSON ({err})") from err
    return records, tag


UNSUPPORTED_HINT = "use .json, .jsonl or .parquet"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class DuplicateKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a key given twice in one object is an error (json keeps the last silently)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(f"key {key!r} is given twice in one object")
        seen[key] = value
    return seen


def loads_unique(text: str):
    return json.loads(text, object_pairs_hook=_unique_keys)


def json_kind(value) -> str:
    """What JSON calls the value's type: null, not NoneType."""
    kinds = ((type(None), "null"), (bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"))
    return next((kind for types_, kind in kinds if isinstance(value, types_)), type(value).__name__)


def json_fault(path: Path) -> str | None:
    """Where a .json/.jsonl file stops being rows of JSON, as "line N: ...", or None if it does not.

    datasets and pyarrow report such faults without the file or the line, and keep the last of a
    key given twice.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is not a fault
    except UnicodeDecodeError as err:
        raw = path.read_bytes()
        start = err.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)  # utf-8-sig counts past its mark
        line = raw[:start].count(b"\n") + 1
        return f"line {line}: not UTF-8 text (byte {start}); re-save the file as UTF-8"
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    first_bad = None
    for number, line in lines:
        try:
            value = loads_unique(line)
        except DuplicateKeyError as err:
            return f"line {number}: {err}"
        except json.JSONDecodeError as err:
            cut = " (the file ends inside it: truncated?)" if number == lines[-1][0] and err.pos >= len(line.rstrip()) else ""
            first_bad = (number, f"{err.msg}{cut}")
            break
        if len(lines) == 1 and isinstance(value, list):  # the whole file as one JSON array on one line
            bad = next((i for i, row in enumerate(value) if not isinstance(row, dict)), None)
            if bad is not None:
                return f"row {bad}: a row must be a JSON object, got {json_kind(value[bad])}"
        elif not isinstance(value, dict):
            return f"line {number}: a row must be a JSON object, got {json_kind(value)}"
    if first_bad is None:
        return None
    try:
        whole = loads_unique(text)
    except DuplicateKeyError as err:
        return str(err)
    except json.JSONDecodeError as err:
        if first_bad[0] != lines[0][0]:
            number, reason = first_bad  # JSON lines, the first bad one
        elif err.pos >= len(text.rstrip()):  # one JSON document, cut short
            number, reason = lines[-1][0], f"{err.msg} (the file ends inside it: truncated?)"
        else:
            number, reason = err.lineno, err.msg
        return f"line {number}: not valid JSON ({reason})"
    if isinstance(whole, list) and not all(isinstance(row, dict) for row in whole):
        bad = next(i for i, row in enumerate(whole) if not isinstance(row, dict))
        return f"row {bad}: a row must be a JSON object, got {json_kind(whole[bad])}"
    return None


def _raw_json_records(path: Path) -> list:
    """The rows of a .json/.jsonl file exactly as JSON has them (datasets may retype a mixed column)."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return whole if isinstance(whole, list) else [whole]


def _local_file_records(path: Path, source: str, builder: str):
    import datasets

    if not path.read_bytes().strip():
        raise DataError(f"{source}: the file is empty")
    # Before datasets, which names neither the file nor the line of a fault, and reads lazily: a decode
    # fault would surface only later.
    fault = json_fault(path) if builder == "json" else None
    if fault:
        raise DataError(f"{source}: {fault}")
    try:
        # A single file is a single split: `split` does not apply to it.
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:
        raise DataError(f"{source}: cannot be read as {path.suffix} ({_first_line(err)})") from err


def _dataset_records(source: str, split: str, hub_config: str):
    import datasets  # heavy; only needed off the bundled path

    path = Path(source).expanduser()
    builder = LOCAL_SUFFIXES.get(path.suffix.lower())
    if path.is_file():
        if builder is None:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}; {UNSUPPORTED_HINT}")
        return _local_file_records(path, source, builder), source
    if not path.exists() and (builder is not None or source.startswith(("/", ".", "~")) or source.count("/") > 1):
        raise DataError(f"{source}: no such file or directory")
    try:
        if path.is_dir():
            # datasets picks the builder from the file types and the split from the file names (train*, test*, ...).
            return datasets.load_dataset(str(path), split=split), f"{source}/{split}"
        return datasets.load_dataset(source, hub_config or None, split=split), f"{source}/{split}"
    except Exception as err:  # a bad split, an unknown hub id, no network: one line naming the source
        raise DataError(f"{source} (split {split!r}): cannot be loaded ({_first_line(err)})") from err


def load_rows(source: str, split: str, fmt: str = "auto", hub_config: str = "main", max_rows: int = 0) -> list[PrivilegedRow]:
    """Rows from `bundled:gsm8k`, a local .json/.jsonl/.parquet file or directory, or a hub id.

    `split` picks bundled train/test, a directory's file by name, or a hub split; a single local file
    is one split and ignores it. `max_rows` keeps the first rows (0 = all).
    """
    dataset = None
    if source.startswith("bundled:"):
        records, tag = _bundled_records(source, split)
        if max_rows > 0:
            records = records[:max_rows]
        columns = sorted({key for record in records for key in record})
    else:
        dataset, tag = _dataset_records(source, split, hub_config)
        if max_rows > 0:
            dataset = dataset.select(range(min(max_rows, len(dataset))))
        columns = dataset.column_names
        records = dataset.to_list()
    if not records:
        raise DataError(f"{tag}: holds no rows")
    if fmt == "auto":
        fmt = _detect_format(columns, tag)
    to_row = TASKS[fmt].to_row
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(f"{tag}#{i}: row must be a JSON object, got {json_kind(record)}")
    try:
        return [to_row(record, f"{tag}#{i}") for i, record in enumerate(records)]
    except DataError as err:
        mixed = _mixed_type_columns(dataset, TASKS[fmt].FIELDS) if dataset is not None else []
        if not mixed:
            raise
        # datasets (5.x) stores a column whose JSON types differ between rows as raw JSON and decodes
        # every value that parses as JSON, so the string "42" comes back as 42 and the row named may be
        # a valid one. A local file's own JSON is the truth: validate that instead, naming the right row.
        local = Path(source).expanduser()
        if local.is_file() and LOCAL_SUFFIXES.get(local.suffix.lower()) == "json":
            raw = _raw_json_records(local)
            raw = raw[:max_rows] if max_rows > 0 else raw
            return [to_row(record, f"{tag}#{i}") for i, record in enumerate(raw)]
        raise DataError(
            f"{err} (note: field(s) {mixed} mix JSON types across rows, and datasets then reads strings "
            'such as "42" as numbers, so the bad row may be a later one; make every value a string)'
        ) from err


def _mixed_type_columns(dataset, names: Sequence[str]) -> list[str]:
    import datasets

    json_feature = getattr(datasets, "Json", None)  # datasets < 4 has no Json feature and no such columns
    if json_feature is None:
        return []

    def has_json(feature) -> bool:
        if isinstance(feature, json_feature):
            return True
        if isinstance(feature, Mapping):
            return any(has_json(f) for f in feature.values())
        return has_json(feature.feature) if hasattr(feature, "feature") else False

    return [name for name in names if name in dataset.features and has_json(dataset.features[name])]


def _prompt_key(row: PrivilegedRow) -> tuple:
    return tuple((m["role"], " ".join(m["content"].split())) for m in row.student_messages)


def count_duplicates(rows: Sequence[PrivilegedRow]) -> int:
    """Rows whose student prompt an earlier row already has (they are kept, and counted)."""
    return len(rows) - len({_prompt_key(row) for row in rows})


def load_train_and_heldout(cfg: DataConfig, max_train_rows: int) -> tuple[list[PrivilegedRow], list[PrivilegedRow]]:
    """Training and held-out rows; a held-out row whose student prompt is also a training prompt is an error.
    `max_train_rows` is `data.max_train_rows` settled (`preflight.resolve_max_train_rows`)."""
    train = load_rows(cfg.train, cfg.train_split, cfg.format, cfg.hub_config, max_train_rows)
    heldout = load_rows(cfg.heldout, cfg.heldout_split, cfg.format, cfg.hub_config, cfg.max_heldout_rows)
    train_ids = {_prompt_key(row): row.row_id for row in train}
    overlap = [(row.row_id, train_ids[_prompt_key(row)]) for row in heldout if _prompt_key(row) in train_ids]
    if overlap:
        heldout_id, train_id = overlap[0]
        raise DataError(
            f"{heldout_id}: field 'messages' is the same student prompt as training row {train_id} "
            f"({len(overlap)} held-out rows overlap training); held-out rows must never be trained on"
        )
    return train, heldout


# ---------------------------------------------------------------- tokens


def _chat_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding; older versions return the list itself.
    if isinstance(ids, Mapping) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _row_chat_ids(tokenizer, row: PrivilegedRow, field: str) -> list[int]:
    messages = row.student_messages if field == "messages" else row.teacher_messages
    try:
        return _chat_ids(tokenizer, messages)
    except Exception as err:  # the template's own raise_exception (jinja2.TemplateError) and its rendering faults
        raise DataError(f"{row.row_id}: field {field!r}: the tokenizer's chat template refuses it ({_first_line(err)})") from err


def tokenize_groups(
    rows: Sequence[PrivilegedRow], tokenizer, max_prompt_tokens: int, drop_overlong: bool = False
) -> tuple[list[PromptGroup], list[str]]:
    """Chat-template both prompts of every row; returns the groups and the ids of rows dropped as over-long.

    Over-long rows are refused (DataError naming the first one) unless `drop_overlong`.
    """
    groups, dropped, problems = [], [], []
    for row in rows:
        student_ids = _row_chat_ids(tokenizer, row, "messages")
        teacher_ids = _row_chat_ids(tokenizer, row, "teacher_messages")
        if len(student_ids) > max_prompt_tokens or len(teacher_ids) > max_prompt_tokens:
            field = "messages" if len(student_ids) > max_prompt_tokens else "teacher_messages"
            dropped.append(row.row_id)
            problems.append(
                f"{row.row_id}: field {field!r} is over data.max_prompt_tokens={max_prompt_tokens} "
                f"(student prompt {len(student_ids)} tokens, teacher prompt {len(teacher_ids)} tokens)"
            )
            continue
        groups.append(PromptGroup(row, student_ids, teacher_ids))
    if problems and not drop_overlong:
        raise DataError(
            f"{problems[0]}; {len(problems)} of {len(rows)} rows are over-long. "
            "Raise data.max_prompt_tokens or set data.drop_overlong=true"
        )
    if rows and not groups:
        raise DataError(f"{problems[0]}; all {len(rows)} rows are over-long, nothing left to train on")
    return groups, dropped


def _reaches(tokenizer, content: str, rendered: str) -> bool:
    """Whether a message's text is in a rendered prompt, as plain words. The text goes through the tokenizer
    first, so that what its normalizer changes (Unicode forms, case, unknown characters) counts as kept."""
    kept = plain_words(tokenizer.decode(tokenizer.encode(content, add_special_tokens=False), skip_special_tokens=False))
    return not kept or f" {kept} " in f" {rendered} "


def _turns(tokenizer, messages, rendered: str) -> list[str]:
    """The turns of `messages` whose text the rendered prompt lacks, as "the system turn (message 0)"."""
    return [
        f"the {m['role']} turn (message {i})"
        for i, m in enumerate(messages)
        if not _reaches(tokenizer, m["content"], rendered)
    ]


def check_rendered_adds_privileged(group: PromptGroup, tokenizer) -> None:
    """Raise DataError if the teacher prompt, as the chat template renders it, adds nothing to the student's.

    `rows.check_adds_privileged` compares the messages' text; a template that skips a turn (a system
    turn, typically) can still render both prompts alike. The rendered teacher prompt adds nothing when
    its ids are the student's, or when none of the teacher's own messages (those whose text no student
    message has) reaches its ids. Either way the message says which turns the template dropped.
    """
    student_ids, teacher_ids = group.student_prompt_ids, group.teacher_prompt_ids
    row = group.row
    rendered = plain_words(tokenizer.decode(teacher_ids, skip_special_tokens=False))
    if teacher_ids == student_ids:
        what = f"the same {len(teacher_ids)} token ids"
    else:
        student_texts = {plain_words(m["content"]) for m in row.student_messages}
        own = [m for m in row.teacher_messages if plain_words(m["content"]) not in student_texts]
        if not own or any(_reaches(tokenizer, m["content"], rendered) for m in own):
            return
        what = f"none of the teacher's own messages reaches its {len(teacher_ids)} token ids"
    dropped = _turns(tokenizer, row.teacher_messages, rendered)
    why = f"the chat template dropped {' and '.join(dropped)}" if dropped else "the chat template dropped no turn"
    raise DataError(
        f"{row.row_id}: field 'teacher_messages': its rendered prompt adds nothing to the student's ({what}; {why}); "
        "with model.teacher_context=privileged the teacher must see what the student does not: put the privileged "
        "text in a turn the chat template renders, or use model.teacher_context=plain"
    )

"""Data: privileged pairs are well-formed and leak-free, bad rows are named, held-out stays held out, the stream resumes."""

from __future__ import annotations

import json

import pytest
import torch

from opd_local.answers import extract_final_answer, normalize_answer
from opd_local.config import Config, DataConfig
from opd_local.data import (
    PromptGroup,
    load_rows,
    load_train_and_heldout,
    tokenize_groups,
)
from opd_local.preflight import check_config, resolve, resolve_max_train_rows
from opd_local.progress import GroupStream
from opd_local.rows import DataError
from opd_local.tasks.gsm8k import to_row as gsm8k_to_row
from opd_local.tasks.messages import to_row as messages_to_row

GOOD_GSM8K = {
    "question": "A shop sells 1,000 pens on Monday and 80 on Tuesday. How many pens in total?",
    "answer": "Monday and Tuesday: 1000 + 80 = <<1000+80=1080>>1080 pens.\n#### 1,080",
}
GOOD_MESSAGES = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 6 * 7?"},
    ],
    "teacher_messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 6 * 7?\nHint: 6 * 7 = 42.\nEnd with `Final: 42`."},
    ],
    "answer": "42",
    "privileged": "Hint: 6 * 7 = 42.",
}


def _train_and_heldout(cfg: DataConfig):
    return load_train_and_heldout(cfg, resolve_max_train_rows(cfg))


def load_run_inputs(cfg):
    from opd_local.run_inputs import load_run_inputs

    return load_run_inputs(cfg, resolve(check_config(cfg), torch.device("cpu")))


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def content(messages) -> str:
    return "\n".join(m["content"] for m in messages)


# ---------------------------------------------------------------- answers


def test_normalize_answer():
    assert normalize_answer("  1,000 ") == "1000"
    assert normalize_answer("1,234,567.") == "1234567"
    assert normalize_answer("3,14") == "3,14"
    assert normalize_answer("  forty   two .") == "forty two"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Final: 3\nmore work\nFinal: 5\nthanks", "5"),
        ("so the answer is\nFinal: **42**.", "42"),
        ("**Final:** 42", "42"),
        ("  `Final: 1,080`  ", "1080"),
        ("Final:7", "7"),
        ("The answer is 42.", None),
        ("I will write Final: 42 at the end", None),
        ("Final:\n", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


# ---------------------------------------------------------------- privileged pairs


def test_gsm8k_pair_is_well_formed():
    row = gsm8k_to_row(GOOD_GSM8K, "x#0")
    student, teacher = content(row.student_messages), content(row.teacher_messages)
    assert row.answer == "1080"
    assert row.privileged == "Monday and Tuesday: 1000 + 80 = 1080 pens."  # <<calc>> annotations stripped
    assert [m["role"] for m in row.student_messages] == ["user"] == [m["role"] for m in row.teacher_messages]
    assert GOOD_GSM8K["question"] in student and "Final: <number>" in student
    assert student in teacher
    assert row.privileged in teacher and "<<" not in teacher
    assert teacher.rstrip().endswith("`Final: 1080`.")  # the pinned line closes the teacher prompt
    assert row.privileged not in student and "Final: 1080" not in student
    assert extract_final_answer(student) is None


def test_bundled_rows_are_well_formed_and_disjoint():
    train = load_rows("bundled:gsm8k", "train")
    heldout = load_rows("bundled:gsm8k", "test")
    assert len(train) == 512 and len(heldout) == 128
    assert load_rows("bundled:gsm8k", "heldout", max_rows=3) == heldout[:3]
    assert train[17].row_id == "bundled:gsm8k/train#17"
    questions = lambda rows: {" ".join(content(r.student_messages).split()) for r in rows}
    assert not questions(train) & questions(heldout)
    for row in train + heldout:
        assert row.privileged and row.privileged not in content(row.student_messages)
        assert content(row.teacher_messages).rstrip().endswith(f"`Final: {row.answer}`.")
        assert "," not in row.answer


def test_default_config_loads_disjoint_train_and_heldout():
    train, heldout = _train_and_heldout(DataConfig())
    # max_train_rows=-1 (auto): the bundled rows' default job trains on 8 of them
    assert len(train) == 8 and len(heldout) == DataConfig().max_heldout_rows
    every_row, _ = _train_and_heldout(DataConfig(max_train_rows=0))
    assert len(every_row) == 512 and [r.row_id for r in every_row[:8]] == [r.row_id for r in train]


def test_auto_train_row_cap_applies_to_the_bundled_rows_only(tmp_path):
    rows = [{**GOOD_GSM8K, "question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(6)]
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    train, _ = _train_and_heldout(DataConfig(train=source))
    assert len(train) == 6


def test_heldout_overlapping_train_is_refused(tmp_path):
    other = {"question": "Sam has 2 cats and gets 3 more. How many cats?", "answer": "2 + 3 = 5\n#### 5"}
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD_GSM8K, other])
    reflowed = dict(other, question="Sam has 2 cats and  gets 3 more.\nHow many cats?")
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{**GOOD_GSM8K, "question": "Unrelated?"}, reflowed])
    with pytest.raises(DataError) as err:
        _train_and_heldout(DataConfig(train=train, heldout=heldout))
    assert f"{heldout}#1" in str(err.value) and f"{train}#1" in str(err.value) and "messages" in str(err.value)

    clean = write_jsonl(tmp_path / "clean.jsonl", [{**GOOD_GSM8K, "question": "Unrelated?"}])
    rows_train, rows_heldout = _train_and_heldout(DataConfig(train=train, heldout=clean))
    assert len(rows_train) == 2 and len(rows_heldout) == 1


# ---------------------------------------------------------------- malformed rows


def messages_with(**changes):
    return {**GOOD_MESSAGES, **changes}


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"answer": GOOD_GSM8K["answer"]}, "question"),
        ({"question": 17, "answer": GOOD_GSM8K["answer"]}, "question"),
        ({"question": "   ", "answer": GOOD_GSM8K["answer"]}, "question"),
        ({"question": "Q?"}, "answer"),
        ({"question": "Q?", "answer": 12}, "answer"),
        ({"question": "Q?", "answer": ""}, "answer"),
        ({"question": "Q?", "answer": "it is 12"}, "answer"),
        ({"question": "Q?", "answer": "12\n####  "}, "answer"),
    ],
)
def test_malformed_gsm8k_row_is_named(tmp_path, bad, field):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD_GSM8K, bad])
    with pytest.raises(DataError) as err:
        load_rows(path, "train", fmt="gsm8k")
    assert f"{path}#1" in str(err.value) and repr(field) in str(err.value)


@pytest.mark.parametrize(
    "bad, field",
    [
        (messages_with(messages=None), "messages"),
        (messages_with(teacher_messages=[]), "teacher_messages"),
        (messages_with(messages="What is 6 * 7?"), "messages"),
        (messages_with(messages=[{"role": "bot", "content": "hi"}]), "messages[0].role"),
        (messages_with(teacher_messages=[{"role": "user", "content": ""}]), "teacher_messages[0].content"),
        (messages_with(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (messages_with(messages=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]), "messages[1].role"),
        (messages_with(privileged=""), "privileged"),
        (messages_with(messages=[{"role": "user", "content": "What? Hint: 6 * 7 = 42."}]), "messages[0].content"),
        (messages_with(messages=[{"role": "user", "content": "What?\nFinal: 42"}]), "messages[0].content"),
    ],
)
def test_malformed_messages_row_is_named(tmp_path, bad, field):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD_MESSAGES, bad])
    with pytest.raises(DataError) as err:
        load_rows(path, "ignored")
    assert f"{path}#1" in str(err.value) and f"'{field}'" in str(err.value)


def test_mixed_type_column_names_the_bad_row(tmp_path):
    # datasets reads a column that mixes strings and numbers as raw JSON, turning the good rows' "42" into 42;
    # the error must still name the row whose answer really is a number
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD_MESSAGES, GOOD_MESSAGES, messages_with(answer=42), GOOD_MESSAGES])
    with pytest.raises(DataError) as err:
        load_rows(path, "train")
    assert str(err.value) == f"{path}#2: field 'answer' must be a string, got int"
    # and a file whose strings merely look like numbers is read as written
    path = write_jsonl(tmp_path / "strings.jsonl", [GOOD_MESSAGES, messages_with(answer="7", messages=[{"role": "user", "content": "3+4?"}])])
    assert [row.answer for row in load_rows(path, "train")] == ["42", "7"]


def test_unknown_columns_are_refused_with_the_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "hi", "completion": "there"}])
    with pytest.raises(DataError, match=r"completion.*prompt.*gsm8k.*messages"):
        load_rows(path, "train")
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "missing.jsonl"), "train")


# ---------------------------------------------------------------- formats


def test_messages_format_round_trips(tmp_path):
    minimal = {"messages": [{"role": "user", "content": "Hi"}], "teacher_messages": [{"role": "user", "content": "Hi (t)"}]}
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD_MESSAGES, minimal])
    rows = load_rows(path, "train")
    assert rows[0] == messages_to_row(GOOD_MESSAGES, f"{path}#0")
    assert list(rows[0].student_messages) == GOOD_MESSAGES["messages"]
    assert list(rows[0].teacher_messages) == GOOD_MESSAGES["teacher_messages"]
    assert (rows[0].answer, rows[0].privileged) == ("42", "Hint: 6 * 7 = 42.")
    # arrow fills absent keys with null: the second row's missing answer/privileged must read as None
    assert (rows[1].answer, rows[1].privileged, rows[1].row_id) == (None, None, f"{path}#1")


def test_a_byte_order_mark_is_read_past(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD_MESSAGES) + "\n").encode())  # as Notepad saves UTF-8
    assert load_rows(str(path), "train") == [messages_to_row(GOOD_MESSAGES, f"{path}#0")]
    path.write_bytes(path.read_bytes() + json.dumps(GOOD_MESSAGES).encode() + b"\n\xe9\n")  # then a Latin-1 byte
    with pytest.raises(DataError, match="line 3: not UTF-8 text"):
        load_rows(str(path), "train")


def test_parquet_and_directory_sources(tmp_path):
    import datasets

    path = str(tmp_path / "rows.parquet")
    datasets.Dataset.from_list([GOOD_GSM8K, {**GOOD_GSM8K, "question": "Other?"}]).to_parquet(path)
    rows = load_rows(path, "whatever", max_rows=1)
    assert len(rows) == 1 and rows[0] == gsm8k_to_row(GOOD_GSM8K, f"{path}#0")

    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [GOOD_GSM8K])
    write_jsonl(folder / "test.jsonl", [{**GOOD_GSM8K, "question": "Test?"}, {**GOOD_GSM8K, "question": "Test 2?"}])
    test_rows = load_rows(str(folder), "test")
    assert [r.row_id for r in test_rows] == [f"{folder}/test#0", f"{folder}/test#1"]
    assert len(load_rows(str(folder), "train")) == 1


# ---------------------------------------------------------------- tokenization


def test_tokenize_groups_builds_chat_prompts(tokenizer):
    rows = load_rows("bundled:gsm8k", "train", max_rows=4)
    groups, dropped = tokenize_groups(rows, tokenizer, max_prompt_tokens=2048)
    assert dropped == [] and [g.row for g in groups] == rows
    for group in groups:
        assert all(type(i) is int for i in group.student_prompt_ids + group.teacher_prompt_ids)
        assert len(group.teacher_prompt_ids) > len(group.student_prompt_ids)
        text = tokenizer.decode(group.teacher_prompt_ids)
        assert text.rstrip().endswith("assistant") and group.row.privileged in text
        assert group.row.privileged not in tokenizer.decode(group.student_prompt_ids)


def test_overlong_prompts_are_refused_or_dropped(tokenizer):
    short = gsm8k_to_row({"question": "1+1?", "answer": "1+1=2\n#### 2"}, "mem#0")
    long_solution = " ".join(["Then add one more apple to the pile."] * 40)
    long = gsm8k_to_row({"question": "Apples?", "answer": f"{long_solution}\n#### 41"}, "mem#1")
    (short_group,), _ = tokenize_groups([short], tokenizer, 10_000)
    (long_group,), _ = tokenize_groups([long], tokenizer, 10_000)
    limit = len(long_group.teacher_prompt_ids) - 1
    assert len(short_group.teacher_prompt_ids) <= limit and len(long_group.student_prompt_ids) <= limit

    with pytest.raises(DataError) as err:
        tokenize_groups([short, long], tokenizer, limit)
    message = str(err.value)
    assert "mem#1" in message and "'teacher_messages'" in message
    assert str(len(long_group.student_prompt_ids)) in message and str(len(long_group.teacher_prompt_ids)) in message

    groups, dropped = tokenize_groups([short, long], tokenizer, limit, drop_overlong=True)
    assert [g.row.row_id for g in groups] == ["mem#0"] and dropped == ["mem#1"]


# ---------------------------------------------------------------- stream


def fake_groups(n):
    return [PromptGroup(gsm8k_to_row({**GOOD_GSM8K, "question": f"Q{i}?"}, f"mem#{i}"), [i], [i]) for i in range(n)]


def ids(groups):
    return [g.row.row_id for g in groups]


def test_group_stream_is_seeded_and_covers_each_epoch():
    groups = fake_groups(7)
    drawn = ids(GroupStream(groups, seed=3).next_groups(21))
    assert drawn == ids(GroupStream(groups, seed=3).next_groups(21))
    assert drawn != ids(GroupStream(groups, seed=4).next_groups(21))
    epochs = [drawn[0:7], drawn[7:14], drawn[14:21]]
    assert all(sorted(e) == sorted(ids(groups)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch
    assert ids(GroupStream(groups, seed=3, shuffle=False).next_groups(9)) == ids(groups + groups[:2])


def test_group_stream_resumes_the_identical_sequence():
    groups = fake_groups(5)
    uninterrupted = GroupStream(groups, seed=0)
    expected = [ids(uninterrupted.next_groups(3)) for _ in range(6)]

    first = GroupStream(groups, seed=0)
    got = [ids(first.next_groups(3)) for _ in range(2)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint round trip
    resumed = GroupStream(groups, seed=0)
    resumed.load_state_dict(state)
    got += [ids(resumed.next_groups(3)) for _ in range(4)]
    assert got == expected

    with pytest.raises(ValueError, match="fingerprint"):
        GroupStream(groups[:4], seed=0).load_state_dict(state)


# ---------------------------------------------------------------- leaks, privileged context, counts


@pytest.mark.parametrize(
    "student_text",
    [
        "What is 6 * 7? hint: 6 * 7 = 42",  # the privileged text in lower case, without its full stop
        "What is 6 * 7?\nHINT 6 * 7 = 42!",  # upper case, punctuation changed, re-wrapped
        "What is 6 * 7? The answer is 42.",  # the answer in other words
        "What is 6 * 7? (answer: 42)",
        "What is 6 * 7?\n#### 42",
    ],
)
def test_leaks_are_caught_whatever_their_spelling(student_text):
    row = messages_with(messages=[{"role": "user", "content": student_text}])
    with pytest.raises(DataError, match=r"x#0: field 'messages\[0\].content' (contains the privileged text|states the final answer)"):
        messages_to_row(row, "x#0")


@pytest.mark.parametrize(
    "question",
    [
        "Tom has 42 apples and eats none of them. How many apples does he have?",  # the answer's number, for another reason
        "Answer in whole numbers: a box holds 42 eggs. How many eggs are in one box?",
        "The answer is 420 when there are ten times as many. How many are there?",  # another number
        "The result is 42.5 kg of flour for 6 loaves; how much for 7 loaves of 6 * 7 size?",
    ],
)
def test_leak_check_has_no_false_positives(question):
    row = messages_with(messages=[{"role": "user", "content": question}])
    assert messages_to_row(row, "x#0").answer == "42"
    gsm8k_to_row({"question": question, "answer": "6 * 7 = 42\n#### 42"}, "y#0")


def test_teacher_prompt_that_adds_nothing_is_refused_under_privileged(tmp_path, tiny_model_dir):

    same = messages_with(teacher_messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "what is 6*7"}])
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD_MESSAGES, {**same, "privileged": None, "answer": None}])
    cfg = Config()
    cfg.model.student = tiny_model_dir
    cfg.data.train = path
    cfg.data.heldout = write_jsonl(tmp_path / "heldout.jsonl", [messages_with(messages=[{"role": "user", "content": "Other?"}])])
    with pytest.raises(DataError, match=rf"{path}#1: field 'teacher_messages' adds nothing to 'messages'"):
        load_run_inputs(cfg)
    cfg.model.teacher_context = "plain"  # the control run: nothing privileged is expected
    assert len(load_run_inputs(cfg).train_groups) == 2


SKIPS_SYSTEM = (
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def _with_template(tokenizer, template):
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def test_a_teacher_prompt_whose_hint_the_template_drops_is_refused_on_the_rendered_ids(tokenizer):
    from opd_local.data import check_rendered_adds_privileged

    question = {"role": "user", "content": "What is 6 * 7?"}
    hint_in_system = messages_to_row(
        messages_with(messages=[question], teacher_messages=[{"role": "system", "content": "Hint: 6 * 7 = 42."}, question]), "h#0"
    )
    hint_in_user = messages_to_row(messages_with(messages=[question]), "h#1")
    skips = _with_template(tokenizer, SKIPS_SYSTEM)
    (dropped, kept), _ = tokenize_groups([hint_in_system, hint_in_user], skips, 2048)
    assert dropped.teacher_prompt_ids == dropped.student_prompt_ids  # what the text check cannot see
    with pytest.raises(DataError) as err:
        check_rendered_adds_privileged(dropped, skips)
    assert str(err.value).startswith(
        f"h#0: field 'teacher_messages': its rendered prompt adds nothing to the student's (the same "
        f"{len(dropped.teacher_prompt_ids)} token ids; the chat template dropped the system turn (message 0))"
    )
    check_rendered_adds_privileged(kept, skips)  # the hint in a turn the template renders
    # SmolLM2's own template renders system turns: the same row passes.
    (group,), _ = tokenize_groups([hint_in_system], tokenizer, 2048)
    check_rendered_adds_privileged(group, tokenizer)

    # A template that writes a default system turn where none is given and drops a given one: the ids differ
    # (the student's are the longer), and still none of the teacher's own text reaches them.
    replaces = _with_template(tokenizer, "{% if messages[0]['role'] != 'system' %}system: Be helpful.\\n{% endif %}" + SKIPS_SYSTEM)
    (group, kept), _ = tokenize_groups([hint_in_system, hint_in_user], replaces, 2048)
    assert group.teacher_prompt_ids != group.student_prompt_ids
    with pytest.raises(DataError, match=r"h#0: .*none of the teacher's own messages reaches its \d+ token ids; "
                                        r"the chat template dropped the system turn \(message 0\)"):
        check_rendered_adds_privileged(group, replaces)
    check_rendered_adds_privileged(kept, replaces)


def test_the_bundled_rows_add_to_the_rendered_student_prompt(tokenizer):
    from opd_local.data import check_rendered_adds_privileged

    for split in ("train", "test"):
        groups, _ = tokenize_groups(load_rows("bundled:gsm8k", split), tokenizer, 2048)
        for group in groups:
            check_rendered_adds_privileged(group, tokenizer)


def test_every_drop_and_duplicate_is_counted(tmp_path, tiny_model_dir):

    long_solution = " ".join(["Then add one more apple to the pile."] * 60)
    overlong = {"question": "Apples?", "answer": f"{long_solution}\n#### 61"}
    other = {"question": "Sam has 2 cats and gets 3 more. How many cats?", "answer": "2 + 3 = 5\n#### 5"}
    cfg = Config()
    cfg.model.student = tiny_model_dir
    cfg.data.train = write_jsonl(tmp_path / "train.jsonl", [GOOD_GSM8K, other, dict(other), overlong, dict(GOOD_GSM8K)])
    cfg.data.heldout = write_jsonl(tmp_path / "heldout.jsonl", [{**GOOD_GSM8K, "question": "Held out?"}, {**overlong, "question": "Pears?"}])
    cfg.data.max_prompt_tokens = 300
    cfg.data.drop_overlong = True
    counts = load_run_inputs(cfg).counts
    assert counts == {
        "data/train_rows": 4,
        "data/heldout_rows": 1,
        "data/overlong_rows_dropped": 1,
        "data/overlong_heldout_rows_dropped": 1,  # was not counted
        "data/duplicate_train_rows": 2,
        "data/duplicate_heldout_rows": 0,
    }


# ---------------------------------------------------------------- file-level faults


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.jsonl", "", "the file is empty"),
        ("blank.jsonl", "\n  \n", "the file is empty"),
        ("prose.jsonl", "these are not rows\n", "line 1: not valid JSON"),
        ("cut.jsonl", json.dumps(GOOD_GSM8K) + "\n" + json.dumps(GOOD_GSM8K) + "\n" + json.dumps(GOOD_GSM8K)[:30], "line 3: not valid JSON"),
        ("array.json", "[\n" + json.dumps(GOOD_GSM8K) + ",\n{\"question\": \n", "line 3: not valid JSON"),
        ("rows.csv", "question,answer\nQ?,#### 1\n", "unsupported file type '.csv'"),
        ("list.jsonl", json.dumps(GOOD_GSM8K) + "\n[1, 2]\n", "line 2: a row must be a JSON object"),
        ("one-line.json", json.dumps([GOOD_GSM8K, 3]), "row 1: a row must be a JSON object, got a number"),
        ("binary.parquet", "not parquet at all", "cannot be read as .parquet"),
    ],
)
def test_file_level_faults_name_the_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as err:
        load_rows(str(path), "train")
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)
    with pytest.raises(DataError, match="no such file or directory"):
        load_rows(str(tmp_path / "missing" / name), "train")


def test_the_row_formats_are_the_configs_choices():
    """`DataConfig.format`'s Literal is the one list of formats a user can name; each must be a task here."""
    import typing

    from opd_local.tasks import TASKS

    assert typing.get_args(typing.get_type_hints(DataConfig)["format"]) == ("auto", *TASKS)

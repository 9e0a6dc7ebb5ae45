"""Teacher-trace eval: span finding, gap arithmetic, answer matching, and the trace cache."""

import pytest
import torch

from opd_local.answers import answers_match
from opd_local.config import ModelConfig
from opd_local.data import PromptGroup
from opd_local.evaluation import (
    TeacherTrace,
    build_teacher_traces,
    evaluate_traces,
    final_answer_span,
    trace_gaps,
)
from opd_local.models import load_causal_lm
from opd_local.rows import PrivilegedRow
from opd_local.samplers import Completion
from opd_local.teacher import Teacher


def _span_text(tokenizer, text, answer, eos=False):
    ids = tokenizer.encode(text, add_special_tokens=False)
    if eos:
        ids = ids + [tokenizer.eos_token_id]
    span = final_answer_span(ids, tokenizer, answer)
    return None if span is None else tokenizer.decode(ids[span[0] : span[1]])


@pytest.mark.parametrize(
    "text, answer, expected",
    [
        ("She has 3 + 4 = 7 apples.\nFinal: 7", "7", "Final: 7"),
        ("Final: 3\nWait, recount.\nFinal: 12", "12", "Final: 12"),  # the last line wins
        ("Total is 1,234 dollars.\n**Final: 1,234**", "1234", "**Final: 1,234**"),
        ("So 70+2.\nFinal:72", "72", "Final:72"),  # no space: digits tokenise on their own
        ("Answer below.\nFinal: 18.", "18", "Final: 18."),
    ],
)
def test_span_is_the_last_final_line(tokenizer, text, answer, expected):
    found = _span_text(tokenizer, text, answer, eos=True)
    assert found is not None and found.strip() == expected  # a leading newline token may be included


def test_span_falls_back_to_answer_tokens_when_prefixes_do_not_line_up(tokenizer):
    # A character split over several byte tokens makes partial decodes end in U+FFFD, so
    # decoded prefixes stop lining up with the text; the answer's own tokens are searched instead.
    text = "Cost 🤖🤖 each 🤖.\nFinal: 45"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode(ids[:k]) for k in range(1, len(ids)))
    span = final_answer_span(ids, tokenizer, "45")
    assert span is not None and tokenizer.decode(ids[span[0] : span[1]]).strip() == "45"
    assert span[1] == len(ids)


def test_no_span_without_final_line_or_answer(tokenizer):
    assert _span_text(tokenizer, "I think it is nine.", "12") is None


def test_gap_arithmetic_by_hand():
    student_lp = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    teacher_lp = torch.tensor([-0.5, -1.0, -3.0, -2.0])
    # per-token gap = student NLL - teacher NLL = teacher_lp - student_lp = [0.5, 1.0, 0.0, 2.0]
    gaps = trace_gaps(student_lp, teacher_lp, span=(2, 4))
    assert gaps["full"] == (3.5, 4)
    assert gaps["pre_final"] == (1.5, 2)
    assert gaps["final"] == (2.0, 2)
    assert set(trace_gaps(student_lp, teacher_lp, span=None)) == {"full"}


def test_eval_gaps_are_token_weighted_across_rows(tiny_model_dir, tokenizer):
    student = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True)["input_ids"]
    from opd_local.scoring import score_completions

    traces = []
    for row_id, split, length, offset, span in [("a", "heldout", 4, 1.0, (2, 4)), ("b", "heldout", 2, 4.0, (0, 1)), ("c", "train", 3, -1.0, None)]:
        ids = torch.randint(0, len(tokenizer), (length,)).tolist()
        (own,) = score_completions(student, [prompt], [ids], micro_batch_tokens=4096).logprobs
        traces.append(TeacherTrace(row_id, split, prompt, ids, (own + offset).tolist(), span, True))
    metrics, records = evaluate_traces(student, traces, micro_batch_tokens=4096)
    assert metrics["eval/trace_gap"] == pytest.approx((4 * 1.0 + 2 * 4.0) / 6, abs=1e-4)  # not the row mean 2.5
    assert metrics["eval/trace_gap_pre_final"] == pytest.approx(1.0, abs=1e-4)  # only row a has tokens before its span
    assert metrics["eval/trace_gap_final"] == pytest.approx((2 * 1.0 + 1 * 4.0) / 3, abs=1e-4)
    assert metrics["eval/trace_gap_train"] == pytest.approx(-1.0, abs=1e-4)
    assert "eval/trace_gap_final_train" not in metrics  # row c has no span
    assert [r["row_id"] for r in records] == ["a", "b", "c"]


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("So it costs 1,000 dollars.\nFinal: 1,000.", "1000", True),
        ("Final: **72**", "72", True),
        ("Final:   3   apples ", "3 apples", True),
        ("Final: 7 2", "72", False),
        ("The answer is 72.", "72", False),  # no Final line, no credit
        ("Final: 71\nFinal: 72", "72", True),
    ],
)
def test_greedy_answer_normalisation(completion, answer, expected):
    assert answers_match(completion, answer) is expected


def test_trace_cache_is_reused_not_regenerated(tiny_teacher_dir, tokenizer, tmp_path):
    teacher = load_causal_lm(tiny_teacher_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    row = PrivilegedRow("r#0", ({"role": "user", "content": "q"},), ({"role": "user", "content": "q"},), "5", None)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True)["input_ids"]
    groups = {"heldout": [PromptGroup(row, prompt, prompt)], "train": []}
    calls = []

    def generate_greedy(prompts, max_tokens):
        calls.append(len(prompts))
        ids = tokenizer.encode("2 + 3 = 5.\nFinal: 5", add_special_tokens=False)[:max_tokens]
        return [Completion(ids, [0.0] * len(ids), "stop") for _ in prompts]

    kwargs = dict(generate_greedy=generate_greedy, teacher=Teacher(teacher, micro_batch_tokens=4096, name="t"), tokenizer=tokenizer, cache_dir=tmp_path)
    first = build_teacher_traces(groups, max_tokens=64, **kwargs)
    second = build_teacher_traces(groups, max_tokens=64, **kwargs)
    assert calls == [1]
    assert first == second and first[0].teacher_final_correct and first[0].span is not None
    build_teacher_traces(groups, max_tokens=32, **kwargs)  # a different setting is a different cache
    assert calls == [1, 1]


def test_eval_script_scores_a_checkpoint_against_a_teacher(tiny_model_dir, tiny_teacher_dir, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "eval"
    cmd = [
        sys.executable, "scripts/eval.py", "--student", tiny_model_dir, "--teacher", tiny_teacher_dir,
        "--sampler", "hf", "--max_heldout_rows", "3", "--eval.train_rows", "2", "--eval.max_trace_tokens", "8",
        "--eval.greedy_max_tokens", "8", "--run.device", "cpu", "--out_dir", str(out),
    ]
    subprocess.run(cmd, check=True, timeout=600)
    subprocess.run(cmd, check=True, timeout=600)  # a second evaluation replaces the first one's records
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert {"eval/trace_gap", "eval/trace_gap_train", "eval/student_greedy_accuracy", "eval/teacher_final_accuracy"} <= set(metrics)
    records = [json.loads(line) for line in (out / "trace_eval.jsonl").read_text().splitlines()]
    assert sorted(r["split"] for r in records) == ["heldout"] * 3 + ["train"] * 2
    # two different random models: the student is far from the teacher on the teacher's own text
    assert metrics["eval/trace_gap"] > 0.1


# metrics.jsonl: a run past step 0; config.yaml alone: a run stopped before its first metrics line
@pytest.mark.parametrize("marker, text", [("metrics.jsonl", '{"step": 0}\n'), ("config.yaml", "run:\n  steps: 5\n")])
def test_eval_script_refuses_a_training_run_directory(tmp_path, marker, text, monkeypatch, capsys):
    import runpy
    import sys

    (tmp_path / marker).write_text(text)
    monkeypatch.setenv("OPD_LOCAL_CPU_THREADS", "off")  # in this process libgomp has read its settings already
    monkeypatch.setattr(sys, "argv", ["scripts/eval.py", "--student", "unused", "--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_code:
        runpy.run_path("scripts/eval.py", run_name="__main__")
    assert exit_code.value.code == 2
    assert f"holds a training run ({marker})" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [marker]
    assert (tmp_path / marker).read_text() == text  # nothing of the run was touched


def test_eval_script_scores_a_runs_final_export_against_the_runs_teacher(tiny_model_dir, tiny_teacher_dir, tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    # A run that started from the teacher's weights (empty model.teacher) and saved tiny_model_dir as final/.
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run_dir / "final")
    (run_dir / "config.yaml").write_text(f"model:\n  student: {tiny_teacher_dir}\n  teacher: ''\n")
    out = tmp_path / "eval"
    subprocess.run(
        [
            sys.executable, "scripts/eval.py", "--student", str(run_dir / "final"), "--sampler", "hf",
            "--max_heldout_rows", "2", "--eval.train_rows", "0", "--eval.max_trace_tokens", "8",
            "--eval.greedy_accuracy", "false", "--run.device", "cpu", "--out_dir", str(out),
        ],
        check=True, timeout=600,
    )
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert metrics["teacher"] == tiny_teacher_dir  # not the trained weights in final/
    assert metrics["eval/trace_gap"] > 0.1

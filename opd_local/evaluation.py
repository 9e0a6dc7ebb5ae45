"""Teacher-trace evaluation and greedy exact match (docs/design.md, "Teacher-trace evaluation").

The frozen teacher writes one greedy trace per row from its privileged prompt; the traces and the
teacher's own logprobs on them are computed once per run and cached. Each evaluation scores the
same trace tokens under the student prompt with the current student and reports the NLL gap
(student − teacher), over the whole trace, before the final-answer span, and on the span.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from opd_local import distributed
from opd_local.answers import FINAL_LINE, answers_match
from opd_local.data import PromptGroup
from opd_local.metrics import span as stage_span  # `span` here is the final-answer span
from opd_local.samplers import Sampler
from opd_local.samplers.hf import HFSampler
from opd_local.scoring import score_completions_distributed
from opd_local.sync import engine_weight_shapes, push_model_weights
from opd_local.teacher import Teacher

TRACE_CACHE = "trace_cache.json"
TRACE_RECORDS = "trace_eval.jsonl"


@dataclass
class TeacherTrace:
    row_id: str
    split: str  # "heldout" or "train"
    student_prompt_ids: list[int]
    trace_ids: list[int]
    teacher_lp: list[float]  # teacher's logprob of each trace token under the teacher prompt
    span: tuple[int, int] | None  # [start, end) of the final-answer span in trace_ids
    teacher_final_correct: bool


def _span_by_decoding(ids: list[int], tokenizer) -> tuple[int, int] | None:
    """Map the last `Final:` line's characters back to tokens by decoding growing prefixes."""
    text = tokenizer.decode(ids)
    matches = list(FINAL_LINE.finditer(text))
    if not matches:
        return None
    start_char, end_char = matches[-1].start(), matches[-1].end()
    start = end = None
    for k in range(len(ids)):
        prefix = tokenizer.decode(ids[: k + 1])
        if not text.startswith(prefix):
            return None  # a multi-token character or a merge: prefixes do not line up
        if start is None and len(prefix) > start_char:
            start = k
        if start is not None and len(prefix) >= end_char:
            end = k + 1
            break
    if start is None or end is None:
        return None
    return start, end


def _find_last(haystack: list[int], needle: list[int]) -> int | None:
    for i in range(len(haystack) - len(needle), -1, -1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return None


def _span_by_answer_tokens(ids: list[int], tokenizer, answer: str) -> tuple[int, int] | None:
    """Fallback: the last occurrence of the answer's own tokens (with or without a leading space)."""
    for variant in (f" {answer}", answer):
        needle = tokenizer.encode(variant, add_special_tokens=False)
        start = _find_last(ids, needle) if needle else None
        if start is not None:
            return start, start + len(needle)
    return None


def final_answer_span(trace_ids: list[int], tokenizer, answer: str | None) -> tuple[int, int] | None:
    """[start, end) of the trace's final-answer span in tokens, or None when there is none.

    Special tokens at the end (end-of-turn) are outside the span.
    """
    ids = list(trace_ids)
    while ids and ids[-1] in tokenizer.all_special_ids:
        ids.pop()
    span = _span_by_decoding(ids, tokenizer)
    if span is None and answer:
        span = _span_by_answer_tokens(ids, tokenizer, answer)
    return span


def trace_gaps(student_lp: torch.Tensor, teacher_lp: torch.Tensor, span: tuple[int, int] | None) -> dict[str, tuple[float, int]]:
    """(sum of per-token gap, token count) over the full trace, before the span and on the span.

    Gap per token = student NLL − teacher NLL = teacher_lp − student_lp. Sums, not means, so that
    rows combine token-weighted.
    """
    gap = (teacher_lp.double() - student_lp.double())
    out = {"full": (float(gap.sum()), gap.numel())}
    if span is not None:
        start, end = span
        out["pre_final"] = (float(gap[:start].sum()), start)
        out["final"] = (float(gap[start:end].sum()), end - start)
    return out


def teacher_greedy(sampler: Sampler, teacher: Teacher, student, eos_token_id: int, pad_token_id: int):
    """A `(prompts, max_tokens) -> completions` function that decodes greedily with the teacher.

    When the two models have the same weight layout, the engine briefly holds the teacher's
    weights (fast decoding), and the student's go back in right after; otherwise transformers
    `generate` runs on the teacher itself.
    """
    if engine_weight_shapes(teacher.model) != engine_weight_shapes(student):

        def generate_with_transformers(prompts, max_tokens):
            with teacher.scope():
                return distributed.call(
                    teacher.model, lambda model: HFSampler(model, eos_token_id, pad_token_id).greedy(prompts, max_tokens)
                )

        return generate_with_transformers

    def generate_with_engine(prompts, max_tokens):
        with teacher.scope():
            push_model_weights(sampler, teacher.model)
        try:
            return sampler.greedy(prompts, max_tokens)
        finally:
            push_model_weights(sampler, student)

    return generate_with_engine


def _cache_key(groups_by_split: dict[str, list[PromptGroup]], teacher_name: str, max_tokens: int, compute_dtype) -> str:
    payload = json.dumps(
        {
            "teacher": teacher_name,
            "max_tokens": max_tokens,
            "compute_dtype": str(compute_dtype),  # bf16 and fp32 teachers decode and score differently
            "rows": {s: [[g.row.row_id, g.teacher_prompt_ids] for g in gs] for s, gs in groups_by_split.items()},
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def build_teacher_traces(
    groups_by_split: dict[str, list[PromptGroup]],
    *,
    generate_greedy,  # (teacher prompt ids, max_tokens) -> list of completions
    teacher: Teacher,
    tokenizer,
    max_tokens: int,
    cache_dir: Path | None,
    write_cache: bool = True,
) -> list[TeacherTrace]:
    """Teacher traces and scores for every eval row, from the cache when it matches."""
    key = _cache_key(groups_by_split, teacher.name, max_tokens, teacher.compute_dtype)
    cache_path = Path(cache_dir) / TRACE_CACHE if cache_dir is not None else None
    if cache_path is not None and cache_path.exists():
        cached = json.loads(cache_path.read_text())
        if cached.get("key") == key:
            return [TeacherTrace(**{**t, "span": tuple(t["span"]) if t["span"] else None}) for t in cached["traces"]]

    flat = [(split, g) for split, groups in groups_by_split.items() for g in groups]
    completions = generate_greedy([g.teacher_prompt_ids for _, g in flat], max_tokens)
    keep = [(split, g, c) for (split, g), c in zip(flat, completions) if c.token_ids]
    teacher_lps = teacher.trace_logprobs([g.teacher_prompt_ids for _, g, _ in keep], [c.token_ids for _, _, c in keep])
    traces = []
    for (split, group, completion), teacher_lp in zip(keep, teacher_lps):
        answer = group.row.answer
        traces.append(
            TeacherTrace(
                row_id=group.row.row_id,
                split=split,
                student_prompt_ids=group.student_prompt_ids,
                trace_ids=list(completion.token_ids),
                teacher_lp=teacher_lp.tolist(),
                span=final_answer_span(completion.token_ids, tokenizer, answer),
                teacher_final_correct=answers_match(tokenizer.decode(completion.token_ids, skip_special_tokens=True), answer),
            )
        )
    if cache_path is not None and write_cache:
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "traces": [asdict(t) for t in traces]}))
        tmp.replace(cache_path)
    return traces


def evaluate_traces(
    student, traces: list[TeacherTrace], micro_batch_tokens: int, compute_dtype: torch.dtype | None = None
) -> tuple[dict[str, float], list[dict]]:
    """Token-weighted trace gaps per split, and one record per row."""
    student_lps = score_completions_distributed(
        student, [t.student_prompt_ids for t in traces], [t.trace_ids for t in traces],
        micro_batch_tokens=micro_batch_tokens, compute_dtype=compute_dtype,
    ).logprobs
    totals: dict[str, list[float]] = {}
    records = []
    for trace, student_lp in zip(traces, student_lps):
        gaps = trace_gaps(student_lp, torch.tensor(trace.teacher_lp), trace.span)
        suffix = "" if trace.split == "heldout" else f"_{trace.split}"
        for part, (total, count) in gaps.items():
            name = "eval/trace_gap" + ("" if part == "full" else f"_{part}") + suffix
            acc = totals.setdefault(name, [0.0, 0])
            acc[0] += total
            acc[1] += count
        records.append(
            {
                "row_id": trace.row_id,
                "split": trace.split,
                "tokens": len(trace.trace_ids),
                "span": list(trace.span) if trace.span else None,
                **{f"gap_{part}": total / count if count else None for part, (total, count) in gaps.items()},
            }
        )
    metrics = {name: total / count for name, (total, count) in totals.items() if count}
    return metrics, records


def greedy_accuracy(sampler: Sampler, groups: list[PromptGroup], tokenizer, max_tokens: int) -> float:
    """Exact match of the student's greedy `Final:` answer, decoded by the run's sampler."""
    if not groups:
        return float("nan")
    completions = sampler.greedy([g.student_prompt_ids for g in groups], max_tokens)
    correct = [
        answers_match(tokenizer.decode(c.token_ids, skip_special_tokens=True), g.row.answer)
        for g, c in zip(groups, completions)
    ]
    return sum(correct) / len(correct)


def teacher_final_accuracy(traces: list[TeacherTrace], split: str = "heldout") -> float:
    chosen = [t.teacher_final_correct for t in traces if t.split == split]
    return sum(chosen) / len(chosen) if chosen else float("nan")


class Evaluator:
    """The run's evaluation: held-out rows (never trained on) and the first training rows."""

    def __init__(
        self, cfg, run_dir: Path, heldout: list[PromptGroup], train: list[PromptGroup], tokenizer, micro_batch_tokens: int,
        write: bool = True, compute_dtype: torch.dtype | None = None,
    ):
        """`write=False` on the other ranks when every rank evaluates (a sharded model): rank 0 writes.
        `compute_dtype` is the precision policy's: both sides are scored as they train and run."""
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.write = write
        self.run_dir = Path(run_dir)
        self.groups_by_split = {"heldout": heldout, "train": train}
        self.tokenizer = tokenizer
        self.micro_batch_tokens = micro_batch_tokens
        self.traces: list[TeacherTrace] = []

    def due(self, step: int) -> bool:
        return self.cfg.eval.every > 0 and step % self.cfg.eval.every == 0

    def prepare(self, generate_greedy, teacher: Teacher) -> None:
        self.traces = build_teacher_traces(
            self.groups_by_split,
            generate_greedy=generate_greedy,
            teacher=teacher,
            tokenizer=self.tokenizer,
            max_tokens=self.cfg.eval.max_trace_tokens,
            cache_dir=self.run_dir,
            write_cache=self.write,
        )

    def run(self, step: int, student, sampler: Sampler) -> dict[str, float]:
        metrics: dict[str, float] = {}
        with stage_span(metrics, "eval", next(student.parameters()).device):
            gaps, records = evaluate_traces(student, self.traces, self.micro_batch_tokens, self.compute_dtype)
            metrics.update(gaps)
            metrics["eval/teacher_final_accuracy"] = teacher_final_accuracy(self.traces)
            metrics["eval/trace_span_found"] = sum(t.span is not None for t in self.traces) / max(len(self.traces), 1)
            if self.cfg.eval.greedy_accuracy:
                metrics["eval/student_greedy_accuracy"] = greedy_accuracy(
                    sampler, self.groups_by_split["heldout"], self.tokenizer, self.cfg.eval.greedy_max_tokens
                )
            if self.write:
                with open(self.run_dir / TRACE_RECORDS, "a") as f:
                    for record in records:
                        f.write(json.dumps({"step": step, **record}) + "\n")
        return metrics

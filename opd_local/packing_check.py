"""The start-up proof that packing changes no logprob, on the run's own models (docs/design.md, "Packing check").

Packing is exact only if every layer keeps the sequences of a row apart. opd-local makes attention
(`attention`) and recurrent and conv layers (`token_mixers`) do so, but a family nobody has tried may
carry another kind of layer, or drop the position ids on the way to its attention. So before step 0 a few
sequences are scored in each row layout the run uses, by the same code and in the run's precision:
once as they are, once with the first sequence's tokens replaced (no other sequence may move), and one
at a time in rows of their own. Where a layout fails, the run falls back to the next one that passes (a
prompt copy per completion, then one sequence per row) and says so in one line.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from opd_local import distributed
from opd_local.packing import PackingPlan, pack_groups, set_packing_plan
from opd_local.scoring import indices_by_prompt, packed_token_logprobs, score_completions_distributed
from opd_local.models import decoder_layers
from opd_local.token_mixers import token_mixer_types

# Two tolerances per dtype, both on max |Δlogprob| (docs/design.md, "Packing check").
# LEAK: the same row with the first sequence's tokens replaced must leave every other sequence's scores as
# they were. Both rows have the same shapes, so the same kernels round the same way: a layout that keeps
# sequences apart measures 0 exactly, in bf16 as in fp32, on every family of tests/test_model_families.py
# and on SmolLM2-135M, MoE included; a leaking layer of a tiny model measures 4e-4 (a short conv, fp32) to 0.2.
LEAK_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
# ALONE: the row against each sequence in a row of its own, which also proves each sequence restarts its
# positions. Matmuls over rows of another length round otherwise: SmolLM2-135M measures 2e-5 in fp32 and
# 0.1-0.25 in bf16 on the probe's random tokens (whose logprobs are large); a position not restarted moves
# a logprob by far more.
ALONE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1.0, torch.float16: 0.5}

# Two prompts, two completions behind each, of uneven lengths: every kind of boundary a row has.
PROMPT_LENGTHS = (11, 17)
COMPLETION_LENGTHS = ((6, 9), (4, 7))


@dataclass
class PackingCheck:
    plan: PackingPlan
    leaks: dict[str, float]  # layout -> max |Δlogprob| of the other sequences when the first one changes
    errors: dict[str, float]  # layout -> max |Δlogprob| against the sequences alone
    dtype: torch.dtype
    seconds: float

    def describe(self, role: str, mixers: list[str]) -> str:
        measured = ", ".join(f"{layout}: leak {self.leaks[layout]:.1e}, vs alone {self.errors[layout]:.1e}" for layout in self.leaks)
        tolerances = f"tolerance {LEAK_TOLERANCE[self.dtype]:.0e} and {ALONE_TOLERANCE[self.dtype]:.0e}"
        head = f"packing check ({role}, {str(self.dtype).removeprefix('torch.')}, {self.seconds:.1f} s): {measured} ({tolerances})"
        if self.plan.packed and self.plan.shared_prompt:
            return head
        layers = f"; token mixers: {', '.join(mixers)}" if mixers else ""
        if not self.plan.packed:
            return f"{head}{layers}: packed rows are not exact, so every sequence gets a row of its own (slower, exact)"
        return f"{head}{layers}: shared-prompt rows are not exact, so each completion gets its own copy of the prompt"


def probe_sequences(vocab_size: int, seed: int = 0):
    """Prompts, their completions, and a replacement first prompt and first completion, of random token ids
    (the check is about layout, not content)."""
    generator = torch.Generator().manual_seed(seed)
    high = min(vocab_size, 32000)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, high, (n,), generator=generator).tolist()

    prompts = [tokens(n) for n in PROMPT_LENGTHS]
    completions = [[tokens(n) for n in lengths] for lengths in COMPLETION_LENGTHS]
    return prompts, completions, tokens(PROMPT_LENGTHS[0]), tokens(COMPLETION_LENGTHS[0][0])


def _training_row_logprobs(model, groups, compute_dtype, differentiated: bool) -> torch.Tensor:
    """A packed row's logprobs through the student's training forward (`scoring.packed_token_logprobs`)."""
    batch = pack_groups(groups).to(next(model.parameters()).device)
    with torch.set_grad_enabled(differentiated):
        return packed_token_logprobs(model, batch, compute_dtype=compute_dtype).detach().float().cpu()


def _layout_logprobs(model, layout: str, pairs, compute_dtype, differentiated: bool, scorer, run) -> torch.Tensor:
    """The logprobs of `(prompt, completion)` pairs, in order, scored in `layout`: `alone`, `packed` or
    `shared prompt` (the pairs of each prompt behind one copy of it)."""
    if scorer is None:  # the student: the rows training builds, each forward through `run`
        if layout == "alone":
            return torch.cat([run(_training_row_logprobs, [(p, [c])], compute_dtype, differentiated) for p, c in pairs])
        groups = [(p, [c]) for p, c in pairs]
        if layout == "shared prompt":
            groups = [(pairs[m[0]][0], [pairs[i][1] for i in m]) for m in indices_by_prompt([p for p, _ in pairs])]
        return run(_training_row_logprobs, groups, compute_dtype, differentiated)
    budget = 1 if layout == "alone" else 1 << 30  # the teacher: its own scoring call, one row or one per sequence
    scores = scorer(
        [p for p, _ in pairs], [c for _, c in pairs], micro_batch_tokens=budget, shared_prefix=layout == "shared prompt",
        compute_dtype=compute_dtype,
    )
    return torch.cat(scores.logprobs).float()


def check_packing(
    model, *, compute_dtype: torch.dtype | None, shared_prompt: bool, vocab_size: int, differentiated: bool = False, scorer=None,
    run=None,
) -> PackingCheck:
    """Score the probe in each layout, and again with its first sequence replaced, against its sequences
    alone; set and return the model's plan.

    Without `scorer`, through the student's training forward (`differentiated` turns autograd on: on a
    CPU in bf16 its attention then takes another path than scoring's); with it, through that scoring
    call (`scoring.score_completions_distributed` on the teacher). `run(fn, *args)` makes the student's
    forwards, `fn(model, *args)` by default (`distributed.call` for a wrapped one). Every rank runs the same forwards,
    so a sharded model's collectives match, and the errors are reduced to their maximum, so every rank
    takes the same plan.
    """
    start = time.perf_counter()
    set_packing_plan(model, PackingPlan())  # the layouts under test, whatever an earlier check found
    prompts, completions, other_prompt, other_completion = probe_sequences(vocab_size)
    pairs = [(p, c) for p, cs in zip(prompts, completions) for c in cs]
    first = len(pairs[0][1])  # the first sequence's tokens lead every layout's output

    run = run or (lambda fn, *args: fn(model, *args))

    def score(layout, pairs):
        return _layout_logprobs(model, layout, pairs, compute_dtype, differentiated, scorer, run)

    alone = score("alone", pairs)
    layouts = ["packed"] + (["shared prompt"] if shared_prompt else [])
    leaks, errors = {}, {}
    for layout in layouts:
        got = score(layout, pairs)
        # The first sequence replaced; in a shared prompt only its completion, which its siblings must not read.
        changed = [(other_prompt if layout == "packed" else pairs[0][0], other_completion)] + pairs[1:]
        changed_scores = score(layout, changed)
        finite = bool(torch.isfinite(got).all() and torch.isfinite(changed_scores).all())
        leaks[layout] = float((got[first:] - changed_scores[first:]).abs().max()) if finite else float("inf")
        errors[layout] = float((got - alone).abs().max()) if finite else float("inf")
    reduced = distributed.all_reduce_max_values(torch.tensor([*leaks.values(), *errors.values()], dtype=torch.float64)).tolist()
    leaks, errors = dict(zip(leaks, reduced[: len(leaks)])), dict(zip(errors, reduced[len(leaks) :]))
    dtype = compute_dtype or next(model.parameters()).dtype
    dtype = dtype if dtype in LEAK_TOLERANCE else torch.float32

    def exact(layout: str) -> bool:
        return leaks[layout] <= LEAK_TOLERANCE[dtype] and errors[layout] <= ALONE_TOLERANCE[dtype]

    packed = exact("packed")
    plan = PackingPlan(packed=packed, shared_prompt=packed and shared_prompt and exact("shared prompt"))
    set_packing_plan(model, plan)
    return PackingCheck(plan, leaks, errors, dtype, time.perf_counter() - start)


def check_run_models(student, teacher, cfg, compute_dtype: torch.dtype | None, vocab_size: int, log) -> dict[str, float]:
    """The check on the student (its training forward) and on a teacher that is another model (its scoring call).

    A teacher that is the student's base with its adapter off runs the same layers: checked once, as the
    student. Returns step-0 metrics: each check's seconds and the layouts it kept.
    """
    module = distributed.unwrap(student)
    checks = [("student", module, cfg.model.student_shared_prefix, None, functools.partial(distributed.call, student))]
    teacher_module = distributed.unwrap(teacher.model)
    if teacher_module.get_decoder() is not module.get_decoder():
        scorer = functools.partial(score_completions_distributed, teacher.model)
        checks.append(("teacher", teacher_module, cfg.model.teacher_shared_prefix and not distributed.is_sharded(teacher.model), scorer, None))
    metrics = {}
    for role, model, shared, scorer, run in checks:
        # The sharded student's forwards stay out of autograd: a graph FSDP2 never sees backward through would
        # leave its state mid-step.
        differentiated = scorer is None and not distributed.is_sharded(student)
        result = check_packing(
            model, compute_dtype=compute_dtype, shared_prompt=shared, vocab_size=vocab_size, differentiated=differentiated,
            scorer=scorer, run=run,
        )
        log(result.describe(role, token_mixer_types(decoder_layers(model))))
        metrics[f"time/packing_check_{role}"] = result.seconds
        metrics[f"packing/{role}_packed"] = float(result.plan.packed)
        metrics[f"packing/{role}_shared_prompt"] = float(result.plan.shared_prompt)
    return metrics

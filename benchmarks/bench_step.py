"""One OPD step, stage by stage: opd-local against the same step built from stock transformers parts.

    python benchmarks/bench_step.py [--groups 4] [--samples 2] [--max_tokens 128] [--repeats 3] [--warmup 1]
                                 [--compare_student_prefix]

Both pipelines run the step of docs/design.md on the same model, prompts and (for scoring and training)
the same sampled completions:
- opd-local: in-process vLLM sampling; the teacher runs each privileged prompt once and scores the
  group's completions on its KV cache (also timed packed, one prompt copy per completion); the
  student over packed rows (no padding), each group's prompt once before its completions (with
  --compare_student_prefix also timed with one prompt copy per completion); the fused-linear kernels, so no [tokens, vocab] logits are
  held; the weight push into vLLM; also the step with the full-vocabulary `full_rkl` objective;
- stock: transformers `generate`; padded batches with an attention mask, full logits and
  `log_softmax`; the same loss; a `load_state_dict` copy into the generating model.
Prints the median seconds per stage after --warmup untimed calls (p10-p90 beside), the ratios stock / opd-local,
and each pipeline's peak memory (harness.py: CUDA allocated, or the process's peak RSS on CPU).
"""

from __future__ import annotations

import argparse
import copy

import torch

from harness import PeakMemory, Stats, alternate_rounds, print_header, time_rounds
from opd_local.config import Config
from opd_local.models import load_causal_lm
from opd_local.optimizer import build_optimizer
from opd_local.output_heads import lm_head_weight
from opd_local.precision import resolve_precision
from opd_local.preflight import resolve_micro_batch_tokens
from opd_local.rollouts import build_rollouts
from opd_local.samplers.hf import HFSampler
from opd_local.samplers.vllm import VLLMSampler
from opd_local.scoring import score_completions
from opd_local.sync import push_model_weights
from opd_local.training import train_on_rollouts
from workload import add_workload_args, load_workload


def padded_token_logprobs(model, prompts, completions) -> list[torch.Tensor]:
    """The stock way: one right-padded batch, full [B, T, V] logits, log_softmax, gather."""
    device = next(model.parameters()).device
    sequences = [p + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, device=device)
        mask[i, : len(s)] = 1
    logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=device)
        out.append(logprobs[i, positions, torch.tensor(c, device=device)])
    return out


def stock_train_step(student, optimizer, prompts, completions, teacher_lps, rollout_lps, cfg: Config, policy) -> None:
    optimizer.zero_grad(set_to_none=True)
    with policy.autocast():
        student_lp = torch.cat(padded_token_logprobs(student, prompts, completions))
    rollout_lp = torch.cat(rollout_lps).to(student_lp.device)
    advantage = cfg.loss.kl_coef * (torch.cat(teacher_lps).to(student_lp.device) - rollout_lp)
    ratio = torch.exp(torch.clamp(student_lp - rollout_lp, max=cfg.loss.log_ratio_cap))
    loss = -(ratio * advantage).sum() / student_lp.numel()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
    optimizer.step()


def stage_seconds(fn, args) -> Stats:
    """--warmup untimed calls of one stage, then --repeats timed ones."""
    return time_rounds(fn, args.repeats, warmup=args.warmup).stats


def compare_student_prefix(train_step, cfg: Config, args) -> dict[bool, Stats]:
    """Train-stage seconds with model.student_shared_prefix on and off, the two settings alternating
    (warm-up rounds too), so that load from other processes falls on both alike."""

    def with_shared_prefix(shared: bool):
        def step():
            cfg.model.student_shared_prefix = shared
            train_step()

        return step

    timings = alternate_rounds({"on": with_shared_prefix(True), "off": with_shared_prefix(False)}, args.repeats,
                               warmup=args.warmup)
    cfg.model.student_shared_prefix = Config().model.student_shared_prefix
    return {True: timings["on"].stats, False: timings["off"].stats}


def opd_local_stages(work, args, policy, completions_from=None):
    """One opd-local step under `policy`, stage by stage: {pipeline: {stage: Stats}}, the rollouts
    scored and trained on (sampled here unless `completions_from` gives them), and extra figures."""
    cfg, device, path, groups, prompts = work.cfg, work.device, work.model_path, work.groups, work.prompts
    tag = "" if policy.compute == torch.float32 else " bf16"
    seconds = {f"opd-local{tag}": {}, f"opd-local{tag} full_rkl": {}}
    (main_row, full_row) = seconds.values()
    student = load_causal_lm(path, cfg.model, policy.master, device)
    teacher = load_causal_lm(path, cfg.model, policy.teacher, device).eval().requires_grad_(False)
    sample_kw = dict(n=args.samples, temperature=1.0, max_tokens=args.max_tokens)
    engine = VLLMSampler(path, cfg, device, policy.engine)
    engine.generate(prompts[:1], n=1, temperature=1.0, max_tokens=8, seed=0)  # warm-up
    completions = completions_from or engine.generate(prompts, seed=0, **sample_kw)
    sampled = {}
    main_row["sample"] = stage_seconds(
        lambda: sampled.update(tokens=sum(len(c.token_ids) for g in engine.generate(prompts, seed=1, **sample_kw) for c in g)),
        args,
    )
    rollouts = build_rollouts(groups, completions)
    kept = [r for r in rollouts if r.kept]
    teacher_prompts = [r.group.teacher_prompt_ids for r in kept]
    completion_ids = [r.completion_ids for r in kept]

    def score(return_hidden=False, shared_prefix=cfg.model.teacher_shared_prefix):
        return score_completions(
            teacher, teacher_prompts, completion_ids, micro_batch_tokens=cfg.optim.micro_batch_tokens,
            return_hidden=return_hidden, shared_prefix=shared_prefix, compute_dtype=policy.compute,
        )

    main_row["score"] = stage_seconds(score, args)
    # The same scoring with every completion packed behind its own copy of the privileged prompt.
    packed_score = stage_seconds(lambda: score(shared_prefix=False), args)
    full_row["score"] = stage_seconds(lambda: score(True), args)
    scores = score(True)
    for rollout, teacher_lp, teacher_hidden in zip(kept, scores.logprobs, scores.hiddens):
        rollout.record_teacher_scores(teacher_lp, teacher_hidden)
    for row, objective in ((main_row, "sampled_rkl"), (full_row, "full_rkl")):
        trained = copy.deepcopy(student)
        optimizer, scheduler = build_optimizer(trained, cfg.optim)
        cfg.loss.objective = objective
        head = lm_head_weight(teacher).detach() if objective == "full_rkl" else None
        budget = cfg.optim.micro_batch_tokens

        def train(head=head):
            return train_on_rollouts(trained, optimizer, scheduler, kept, cfg, policy, budget, head)

        row["train"] = stage_seconds(train, args)
        if args.compare_student_prefix and objective == "sampled_rkl":
            extras_train = compare_student_prefix(lambda: train(None), cfg, args)
        row["push"] = stage_seconds(lambda: push_model_weights(engine, trained), args)
        row["sample"] = main_row["sample"]
        del trained, optimizer, scheduler
    cfg.loss.objective = "sampled_rkl"
    engine.close()
    extras = {"sampled_tokens": sampled["tokens"], "packed_score": packed_score, "policy": policy.describe()}
    if args.compare_student_prefix:
        extras["student_prefix"] = extras_train
    return seconds, completions, kept, extras


def stock_stages(work, args, policy, kept) -> tuple[dict[str, Stats], int]:
    """The same step from stock transformers parts under `policy`, on the same rollouts: its stages' Stats and
    the tokens it sampled."""
    cfg, device, path, tokenizer, prompts = work.cfg, work.device, work.model_path, work.tokenizer, work.prompts
    student = load_causal_lm(path, cfg.model, policy.master, device)
    teacher = load_causal_lm(path, cfg.model, policy.teacher, device).eval().requires_grad_(False)
    sample_kw = dict(n=args.samples, temperature=1.0, max_tokens=args.max_tokens)
    row, sampled = {}, {}
    stock = HFSampler.load(path, cfg.model, device, tokenizer.eos_token_id, tokenizer.pad_token_id, policy.engine)
    stock.generate(prompts[:1], n=1, temperature=1.0, max_tokens=8, seed=0)
    row["sample"] = stage_seconds(
        lambda: sampled.update(tokens=sum(len(c.token_ids) for g in stock.generate(prompts, seed=1, **sample_kw) for c in g)),
        args,
    )
    teacher_prompts = [r.group.teacher_prompt_ids for r in kept]
    student_prompts = [r.group.student_prompt_ids for r in kept]
    completion_ids = [r.completion_ids for r in kept]
    with torch.no_grad(), policy.autocast():
        row["score"] = stage_seconds(lambda: padded_token_logprobs(teacher, teacher_prompts, completion_ids), args)
    optimizer, _ = build_optimizer(student, cfg.optim)
    teacher_lps = [r.teacher_lp for r in kept]
    rollout_lps = [r.rollout_lp for r in kept]
    row["train"] = stage_seconds(
        lambda: stock_train_step(student, optimizer, student_prompts, completion_ids, teacher_lps, rollout_lps, cfg, policy),
        args,
    )
    row["push"] = stage_seconds(lambda: stock.model.load_state_dict(student.state_dict()), args)
    return row, sampled["tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser, samples=2)
    parser.add_argument(
        "--precisions", nargs="+", default=["auto", "float32"],
        help="model.dtype settings to run opd-local under, side by side (the first one's rollouts are scored and trained on by all)",
    )
    parser.add_argument("--stock_precision", default="auto", help="model.dtype of the stock pipeline ('none' skips it)")
    parser.add_argument(
        "--compare_student_prefix", action="store_true",
        help="also time the train stage with model.student_shared_prefix on and off, alternating",
    )
    args = parser.parse_args()
    work = load_workload(args)
    cfg, device = work.cfg, work.device
    cfg.optim.micro_batch_tokens = resolve_micro_batch_tokens(cfg.optim, device.type)
    print_header("bench_step", device, [
        f"model {args.model}; each stage: {args.warmup} untimed call(s), then the median of {args.repeats} "
        "(p10-p90 below); peak memory over each pipeline's loading and stages (harness.PeakMemory: CUDA allocated "
        "above the start, or the process's peak RSS on CPU)"])
    stats: dict[str, dict[str, Stats]] = {}
    peaks: dict[str, PeakMemory] = {}
    extras = {}
    completions = kept = None
    stock_tokens = None
    for setting in args.precisions:
        policy = resolve_precision(setting, device)
        with PeakMemory(device) as peaks[f"opd-local --dtype {setting}"]:
            rows, completions, kept, extras[setting] = opd_local_stages(work, args, policy, completions)
        stats.update(rows)
    if args.stock_precision != "none":
        stock_policy = resolve_precision(args.stock_precision, device)
        name = "stock" + ("" if stock_policy.compute == torch.float32 else " bf16")
        with PeakMemory(device) as peaks[name]:
            stats[name], stock_tokens = stock_stages(work, args, stock_policy, kept)
    report(args, stats, peaks, extras, kept, stock_tokens)


STAGES = ("sample", "score", "train", "push")


def report(args, stats: dict[str, dict[str, Stats]], peaks: dict[str, PeakMemory], extras: dict, kept,
           stock_tokens) -> None:
    """The stage table (medians, then p10-p90), peak memory, the extra figures and the ratios."""
    seconds = {name: {s: st.median for s, st in row.items()} for name, row in stats.items()}
    tokens = sum(len(r.completion_ids) for r in kept)
    print(
        f"workload: {args.groups} prompts x {args.samples} samples, max_tokens {args.max_tokens}; scoring and training "
        f"on the same {len(kept)} completions ({tokens} tokens); median of {args.repeats} after {args.warmup} warm-up"
    )
    for setting, extra in extras.items():
        print(f"--dtype {setting}: {extra['policy']}")
    print(f"{'pipeline':<26}" + "".join(f"{s + ' s':>10}" for s in STAGES) + f"{'step s':>10}")
    for name, row in seconds.items():
        print(f"{name:<26}" + "".join(f"{row[s]:>10.3f}" for s in STAGES) + f"{sum(row.values()):>10.3f}")
    print(f"{'p10-p90':<26}" + "".join(f"{s + ' s':>14}" for s in STAGES))
    for name, row in stats.items():
        print(f"{name:<26}" + "".join(f"{row[s].spread():>14}" for s in STAGES))
    for name, peak in peaks.items():
        print(f"peak memory, {name}: {peak.text()}")
    names = list(seconds)
    for setting, extra in extras.items():
        row = seconds[names[0 if setting == args.precisions[0] else 2]] if len(args.precisions) > 1 else seconds[names[0]]
        print(
            f"--dtype {setting}: sampling {extra['sampled_tokens'] / row['sample']:.1f} tok/s; teacher scoring with the prompt "
            f"run once per group {row['score']:.3f} s, packed with each completion {extra['packed_score'].median:.3f} s"
        )

        if "student_prefix" in extra:
            on, off = extra["student_prefix"][True], extra["student_prefix"][False]
            print(f"--dtype {setting}: train with the student prompt once per group {on.median:.3f} s "
                  f"(p10-p90 {on.spread()}), once per completion {off.median:.3f} s (p10-p90 {off.spread()}) "
                  f"({off.median / on.median:.2f}x), alternating, median of {args.repeats}")

    def ratio_line(slow: str, fast: str) -> str:
        a, b = seconds[slow], seconds[fast]
        per_stage = ", ".join(f"{s} {a[s] / b[s]:.2f}x" for s in STAGES)
        return f"{slow} / {fast}: {per_stage}, step {sum(a.values()) / sum(b.values()):.2f}x"

    if len(args.precisions) > 1:
        print(ratio_line(names[2], names[0]))
    stock_names = [n for n in names if n.startswith("stock")]
    if stock_names:
        same = next((n for n in names if not n.startswith("stock") and "full_rkl" not in n
                     and (" bf16" in n) == (" bf16" in stock_names[0])), names[0])
        print(ratio_line(stock_names[0], same))
        print(f"sampling: stock generate {stock_tokens / seconds[stock_names[0]]['sample']:.1f} tok/s")


if __name__ == "__main__":
    main()

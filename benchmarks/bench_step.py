"""One OPD step, stage by stage: opd-local against the same step built from stock transformers parts.

    python benchmarks/bench_step.py [--groups 4] [--samples 2] [--max_tokens 128] [--repeats 3]

Both pipelines run the step of DESIGN.md on the same model, prompts and (for scoring and training)
the same sampled completions:
- opd-local: in-process vLLM sampling; the teacher runs each privileged prompt once and scores the
  group's completions on its KV cache (also timed packed, one prompt copy per completion); the
  student over packed rows (no padding); the fused-linear kernels, so no [tokens, vocab] logits are
  held; the weight push into vLLM; also the step with the full-vocabulary `full_rkl` objective;
- stock: transformers `generate`; padded batches with an attention mask, full logits and
  `log_softmax`; the same loss; a `load_state_dict` copy into the generating model.
Prints the median seconds per stage, the ratios stock / opd-local, and peak memory on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

from opd_local.config import Config
from opd_local.loop import build_optimizer, train_on_rollouts
from opd_local.models import lm_head_weight, load_causal_lm
from opd_local.rollouts import attach_teacher_scores, build_rollouts
from opd_local.sampler import HFSampler
from opd_local.scoring import autocast_for, score_completions
from opd_local.sync import push_weights
from opd_local.vllm_sampler import VLLMSampler
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


def stock_train_step(student, optimizer, prompts, completions, teacher_lps, rollout_lps, cfg: Config) -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(next(student.parameters()).device):
        student_lp = torch.cat(padded_token_logprobs(student, prompts, completions))
    rollout_lp = torch.cat(rollout_lps).to(student_lp.device)
    advantage = cfg.loss.kl_coef * (torch.cat(teacher_lps).to(student_lp.device) - rollout_lp)
    ratio = torch.exp(torch.clamp(student_lp - rollout_lp, max=cfg.loss.log_ratio_cap))
    loss = -(ratio * advantage).sum() / student_lp.numel()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
    optimizer.step()


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser, samples=2)
    args = parser.parse_args()
    work = load_workload(args)
    cfg, device, path, tokenizer, groups, prompts = (
        work.cfg, work.device, work.model_path, work.tokenizer, work.groups, work.prompts
    )
    student = load_causal_lm(path, cfg.model, torch.float32, device)
    teacher = load_causal_lm(path, cfg.model, torch.float32, device).eval().requires_grad_(False)
    budget = cfg.optim.micro_batch_tokens or (1024 if device.type == "cpu" else 16384)
    cfg.optim.micro_batch_tokens = budget
    sample_kw = dict(n=args.samples, temperature=1.0, max_tokens=args.max_tokens)
    seconds: dict[str, dict[str, float]] = {"opd-local": {}, "opd-local full_rkl": {}, "stock": {}}
    sampled_tokens: dict[str, int] = {}

    def count(completion_groups, engine_name):  # the same seed each repeat, so the same count
        sampled_tokens[engine_name] = sum(len(c.token_ids) for g in completion_groups for c in g)

    # ---- opd-local: vLLM in process, packed fused scoring and training, in-place push ----
    engine = VLLMSampler(path, cfg, device)
    engine.generate(prompts[:1], n=1, temperature=1.0, max_tokens=8, seed=0)  # warm-up
    completions = engine.generate(prompts, seed=0, **sample_kw)
    seconds["opd-local"]["sample"] = median_seconds(lambda: count(engine.generate(prompts, seed=1, **sample_kw), "vllm"), args.repeats)
    rollouts = build_rollouts(groups, completions)
    kept = [r for r in rollouts if r.kept]
    tokens = sum(len(r.completion_ids) for r in kept)
    teacher_prompts = [r.group.teacher_prompt_ids for r in kept]
    completion_ids = [r.completion_ids for r in kept]

    def score(return_hidden=False, shared_prefix=cfg.model.teacher_shared_prefix):
        return score_completions(
            teacher, teacher_prompts, completion_ids, micro_batch_tokens=budget, return_hidden=return_hidden,
            shared_prefix=shared_prefix,
        )

    seconds["opd-local"]["score"] = median_seconds(score, args.repeats)
    # The same scoring with every completion packed behind its own copy of the privileged prompt.
    packed_score_seconds = median_seconds(lambda: score(shared_prefix=False), args.repeats)
    seconds["opd-local full_rkl"]["score"] = median_seconds(lambda: score(True), args.repeats)
    attach_teacher_scores(rollouts, *score(True))
    for name, objective in (("opd-local", "sampled_rkl"), ("opd-local full_rkl", "full_rkl")):
        trained = copy.deepcopy(student)
        optimizer, _ = build_optimizer(trained, cfg)
        cfg.loss.objective = objective
        head = lm_head_weight(teacher).detach() if objective == "full_rkl" else None
        seconds[name]["train"] = median_seconds(lambda: train_on_rollouts(trained, optimizer, kept, cfg, head), args.repeats)
        seconds[name]["push"] = median_seconds(lambda: push_weights(engine, trained), args.repeats)
        seconds[name]["sample"] = seconds["opd-local"]["sample"]
        del trained, optimizer
    cfg.loss.objective = "sampled_rkl"
    engine.close()

    # ---- stock: transformers generate, padded full-logit scoring and training, state-dict copy ----
    stock = HFSampler.load(path, cfg.model, device, tokenizer.eos_token_id, tokenizer.pad_token_id)
    stock.generate(prompts[:1], n=1, temperature=1.0, max_tokens=8, seed=0)
    seconds["stock"]["sample"] = median_seconds(lambda: count(stock.generate(prompts, seed=1, **sample_kw), "generate"), args.repeats)
    student_prompts = [r.group.student_prompt_ids for r in kept]
    with torch.no_grad():
        seconds["stock"]["score"] = median_seconds(
            lambda: padded_token_logprobs(teacher, teacher_prompts, completion_ids), args.repeats
        )
    trained = copy.deepcopy(student)
    optimizer, _ = build_optimizer(trained, cfg)
    teacher_lps = [r.teacher_lp for r in kept]
    rollout_lps = [r.rollout_lp for r in kept]
    seconds["stock"]["train"] = median_seconds(
        lambda: stock_train_step(trained, optimizer, student_prompts, completion_ids, teacher_lps, rollout_lps, cfg),
        args.repeats,
    )
    seconds["stock"]["push"] = median_seconds(lambda: stock.model.load_state_dict(trained.state_dict()), args.repeats)

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    print(f"device: {device_name}, torch threads {torch.get_num_threads()}, model {args.model}")
    print(
        f"workload: {args.groups} prompts x {args.samples} samples, max_tokens {args.max_tokens}; scoring and training "
        f"on the same {len(kept)} completions ({tokens} tokens); median of {args.repeats}"
    )
    stages = ("sample", "score", "train", "push")
    print(f"{'pipeline':<20}" + "".join(f"{s + ' s':>10}" for s in stages) + f"{'step s':>10}")
    for name, row in seconds.items():
        print(f"{name:<20}" + "".join(f"{row[s]:>10.3f}" for s in stages) + f"{sum(row.values()):>10.3f}")
    print(
        f"sampling throughput: vllm {sampled_tokens['vllm'] / seconds['opd-local']['sample']:.1f} tok/s, "
        f"generate {sampled_tokens['generate'] / seconds['stock']['sample']:.1f} tok/s "
        f"({sampled_tokens['vllm']} and {sampled_tokens['generate']} tokens)"
    )
    print(
        f"teacher scoring: prompt run once per group {seconds['opd-local']['score']:.3f} s, packed with each "
        f"completion {packed_score_seconds:.3f} s ({packed_score_seconds / seconds['opd-local']['score']:.2f}x)"
    )
    ours, theirs = seconds["opd-local"], seconds["stock"]
    ratios = ", ".join(f"{s} {theirs[s] / ours[s]:.2f}x" for s in stages)
    print(f"stock / opd-local: {ratios}, step {sum(theirs.values()) / sum(ours.values()):.2f}x")


if __name__ == "__main__":
    main()

"""Rollout throughput: in-process vLLM against transformers `generate`, each in bf16 and fp32, same
prompts, same model.

    python benchmarks/bench_rollout.py [--groups 4] [--samples 4] [--max_tokens 128] [--repeats 3] [--engines ...]

Prints generated tokens/s for each engine, the ratios, and the in-place weight-push time (from the
trainer's fp32 master weights), with each median's p10-p90 and each engine's peak memory (harness.py). Every engine samples K completions per prompt at temperature 1 with
logprobs, as the trainer does. bf16 is what `--dtype auto` gives the engine on a device that
multiplies in bf16 natively; on one that does not, the bf16 rows are emulated and slow.
"""

from __future__ import annotations

import argparse

import torch

from harness import PeakMemory, Stats, print_header, time_rounds
from opd_local.models import load_causal_lm
from opd_local.samplers.hf import HFSampler
from opd_local.sync import push_model_weights
from opd_local.samplers.vllm import VLLMSampler
from workload import add_workload_args, load_workload


def time_generate(sampler, prompts, args) -> tuple[float, int, Stats]:
    """Seconds and generated tokens of the median run (a real run, so the two go together), and all runs' stats."""

    def generate(seed):
        groups = sampler.generate(prompts, n=args.samples, temperature=1.0, max_tokens=args.max_tokens, seed=seed)
        return sum(len(c.token_ids) for g in groups for c in g)

    for extra in range(args.warmup):  # seeds after the timed runs', which keep 0, 1, ...
        generate(args.repeats + extra)
    seeds = iter(range(args.repeats))
    timing = time_rounds(lambda: generate(next(seeds)), args.repeats, warmup=0)
    timing.warmup = args.warmup
    median = timing.median_round()
    return timing.seconds[median], timing.results[median], timing.stats


def time_push(sampler, student, args) -> Stats:
    """push_model_weights times itself (the seconds it returns)."""
    for _ in range(args.warmup):
        push_model_weights(sampler, student)
    return Stats.of([push_model_weights(sampler, student) for _ in range(args.repeats)], args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser, samples=4)
    parser.add_argument("--engines", nargs="+", default=["vllm_bf16", "vllm_fp32", "hf_bf16", "hf_fp32"])
    args = parser.parse_args()
    work = load_workload(args)
    cfg, device, path, tokenizer, prompts = work.cfg, work.device, work.model_path, work.tokenizer, work.prompts
    student = load_causal_lm(path, cfg.model, torch.float32, device)
    candidates = {
        "vllm_bf16": lambda: VLLMSampler(path, cfg, device, torch.bfloat16),
        "vllm_fp32": lambda: VLLMSampler(path, cfg, device, torch.float32),
        "hf_bf16": lambda: HFSampler.load(path, cfg.model, device, tokenizer.eos_token_id, tokenizer.pad_token_id, torch.bfloat16),
        "hf_fp32": lambda: HFSampler.load(path, cfg.model, device, tokenizer.eos_token_id, tokenizer.pad_token_id, torch.float32),
    }

    print_header("bench_rollout", device, [
        f"model {args.model}; workload: {args.groups} prompts x {args.samples} samples, max_tokens {args.max_tokens}, "
        f"temperature 1; each engine: an 8-token warm-up generate and {args.warmup} untimed full one(s), then the "
        f"median of {args.repeats} (p10-p90 beside it); push: {args.warmup} untimed, median of {args.repeats}; "
        "peak GiB: over the engine's build, runs and pushes (harness.PeakMemory: CUDA allocated above the start, "
        "or the process's peak RSS on CPU)"])
    results = {}
    for name in args.engines:
        with PeakMemory(device) as peak:
            sampler = candidates[name]()
            sampler.generate(prompts[:1], n=1, temperature=1.0, max_tokens=8, seed=0)  # warm-up
            seconds, tokens, stats = time_generate(sampler, prompts, args)
            push = time_push(sampler, student, args)
        results[name] = {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "push_s": push.median,
                         "stats": stats, "push": push, "peak": peak.gib}
        sampler.close()
        del sampler

    print(f"{'engine':<12} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'push s':>7} {'p10-p90 s':>13} "
          f"{'push p10-p90':>13} {'peak GiB':>9}")
    for name, r in results.items():
        print(f"{name:<12} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tok_s']:>8.1f} {r['push_s']:>7.3f} "
              f"{r['stats'].spread(spec='.2f'):>13} {r['push'].spread():>13} {r['peak']:>9.2f}")
    for a, b in (("vllm_bf16", "vllm_fp32"), ("hf_bf16", "hf_fp32"), ("vllm_fp32", "hf_fp32"), ("vllm_bf16", "hf_bf16")):
        if a in results and b in results:
            print(f"{a} / {b} throughput: {results[a]['tok_s'] / results[b]['tok_s']:.2f}x")


if __name__ == "__main__":
    main()

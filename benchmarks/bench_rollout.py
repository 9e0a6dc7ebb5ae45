"""Rollout throughput: in-process vLLM against transformers `generate`, same prompts, same model.

    python benchmarks/bench_rollout.py [--groups 4] [--samples 4] [--max_tokens 128] [--repeats 3]

Prints generated tokens/s for each engine, their ratio, and the in-place weight-push time.
Both engines sample K completions per prompt at temperature 1 with logprobs, as the trainer does.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from opd_local.models import load_causal_lm
from opd_local.sampler import HFSampler
from opd_local.sync import push_weights
from opd_local.vllm_sampler import VLLMSampler
from workload import add_workload_args, load_workload


def time_generate(sampler, prompts, args) -> tuple[float, int]:
    """Median seconds over repeats, and generated tokens in the median run."""
    runs = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        groups = sampler.generate(prompts, n=args.samples, temperature=1.0, max_tokens=args.max_tokens, seed=repeat)
        seconds = time.perf_counter() - start
        runs.append((seconds, sum(len(c.token_ids) for g in groups for c in g)))
    runs.sort()
    return runs[len(runs) // 2]


def time_push(sampler, student, repeats: int) -> float:
    return statistics.median(push_weights(sampler, student) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser, samples=4)
    args = parser.parse_args()
    work = load_workload(args)
    cfg, device, path, tokenizer, prompts = work.cfg, work.device, work.model_path, work.tokenizer, work.prompts
    student = load_causal_lm(path, cfg.model, torch.float32, device)

    results = {}
    for name, build in (
        ("vllm", lambda: VLLMSampler(path, cfg, device)),
        ("hf_generate", lambda: HFSampler.load(path, cfg.model, device, tokenizer.eos_token_id, tokenizer.pad_token_id)),
    ):
        sampler = build()
        sampler.generate(prompts[:1], n=1, temperature=1.0, max_tokens=8, seed=0)  # warm-up
        seconds, tokens = time_generate(sampler, prompts, args)
        results[name] = {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "push_s": time_push(sampler, student, args.repeats)}
        sampler.close()
        del sampler

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    print(f"device: {device_name}, torch threads {torch.get_num_threads()}, model {args.model}")
    print(f"workload: {args.groups} prompts x {args.samples} samples, max_tokens {args.max_tokens}, temperature 1, median of {args.repeats}")
    print(f"{'engine':<12} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'push s':>7}")
    for name, r in results.items():
        print(f"{name:<12} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tok_s']:>8.1f} {r['push_s']:>7.3f}")
    print(f"vllm / hf_generate throughput: {results['vllm']['tok_s'] / results['hf_generate']['tok_s']:.2f}x")


if __name__ == "__main__":
    main()

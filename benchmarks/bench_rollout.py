"""Rollout throughput: in-process vLLM against transformers `generate`, each in bf16 and fp32, same
prompts, same model.

    python benchmarks/bench_rollout.py [--groups 4] [--samples 4] [--max_tokens 128] [--repeats 3] [--engines ...]

Prints generated tokens/s for each engine, the ratios, and the in-place weight-push time (from the
trainer's fp32 master weights). Every engine samples K completions per prompt at temperature 1 with
logprobs, as the trainer does. bf16 is what `--dtype auto` gives the engine on a device that
multiplies in bf16 natively; on one that does not, the bf16 rows are emulated and slow.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from opd_local.models import load_causal_lm
from opd_local.samplers.hf import HFSampler
from opd_local.sync import push_model_weights
from opd_local.samplers.vllm import VLLMSampler
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
    return statistics.median(push_model_weights(sampler, student) for _ in range(repeats))


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

    results = {}
    for name in args.engines:
        sampler = candidates[name]()
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
    for a, b in (("vllm_bf16", "vllm_fp32"), ("hf_bf16", "hf_fp32"), ("vllm_fp32", "hf_fp32"), ("vllm_bf16", "hf_bf16")):
        if a in results and b in results:
            print(f"{a} / {b} throughput: {results[a]['tok_s'] / results[b]['tok_s']:.2f}x")


if __name__ == "__main__":
    main()

"""Shared-prompt rows against a prompt copy per completion, for a model with recurrent layers (Qwen 3.5's
Gated DeltaNet) and one without (LLaMA), through the student's training forward and backward.

A shared-prompt row runs the prompt once through attention and the MLPs; its recurrent layers replay the
prompt's inputs before each completion (`opd_local.token_mixers`). The alternative runs K prompt copies
through every layer. Both are exact (tests/test_model_families.py); this measures which is faster, side by
side in one process, alternating A/B, random-init models built from their configs (no download).

    python benchmarks/bench_packing.py [--prompt 192] [--completion 96] [--k 4] [--repeats 5] [--dtype float32]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness import PeakMemory, alternate_rounds, print_header  # noqa: E402
from opd_local.config import ModelConfig  # noqa: E402
from opd_local.models import load_causal_lm, load_tokenizer  # noqa: E402
from opd_local.packing import pack_groups  # noqa: E402
from opd_local.scoring import packed_token_logprobs  # noqa: E402

ASSETS = ROOT / "tests" / "assets" / "smollm2-135m-instruct"


def build(family: str, tokenizer, path: Path, hidden: int, layers: int) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3_5TextConfig

    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(hidden // 256, 1), head_dim=64,
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    if family == "qwen3_5":
        config = Qwen3_5TextConfig(
            **common, layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"] * (layers // 4),
            linear_num_key_heads=hidden // 128, linear_num_value_heads=hidden // 64, linear_key_head_dim=64,
            linear_value_head_dim=64,
        )
    else:
        config = LlamaConfig(**common)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def step_seconds(model, groups, dtype) -> float:
    batch = pack_groups(groups)
    start = time.perf_counter()
    logprobs = packed_token_logprobs(model, batch, compute_dtype=dtype)
    logprobs.sum().backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=192)
    parser.add_argument("--completion", type=int, default=96)
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    tokenizer = load_tokenizer(str(ASSETS), ModelConfig())
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(0, len(tokenizer), (n,), generator=g).tolist()

    groups = [(tokens(args.prompt), [tokens(args.completion) for _ in range(args.k)]) for _ in range(args.groups)]
    layouts = {"shared prompt": groups, "prompt copies": [(p, [c]) for p, cs in groups for c in cs]}
    print_header("bench_packing", "cpu", [
        f"{args.dtype}; {args.groups} groups x {args.k} completions of {args.completion} behind a {args.prompt}-token "
        f"prompt; hidden {args.hidden}, {args.layers} layers; forward + backward (packing left out), {WARMUP} warm-up "
        f"rounds, then the median of {args.repeats} (alternating), p10-p90 beside it; peak: the process's peak RSS "
        "over a model's rounds"])
    print("| model | shared prompt (s) | prompt copies (s) | copies / shared | shared p10-p90 (s) | copies p10-p90 (s) "
          "| peak GiB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("qwen3_5", "llama"):
            path = build(family, tokenizer, Path(tmp) / family, args.hidden, args.layers)
            model = load_causal_lm(path, ModelConfig(), torch.float32, torch.device("cpu")).train()
            rounds = {name: functools.partial(step_seconds, model, layout, dtype) for name, layout in layouts.items()}
            # warm-up: the first calls of the chunked delta rule are several times slower
            with PeakMemory("cpu") as peak:
                timings = alternate_rounds(rounds, args.repeats, warmup=WARMUP, self_timed=True)
            shared, copies = (timings[name].stats for name in layouts)
            print(f"| {family} | {shared.median:.3f} | {copies.median:.3f} | {copies.median / shared.median:.2f}x "
                  f"| {shared.spread()} | {copies.spread()} | {peak.gib:.2f} |", flush=True)


WARMUP = 2


if __name__ == "__main__":
    main()

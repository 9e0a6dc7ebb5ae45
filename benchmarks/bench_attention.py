"""Packed-row attention paths side by side: time of one packed forward, and packed vs unpacked hidden states.

    python benchmarks/bench_attention.py                         # CPU: sdpa (dense mask), per_sequence, flex
    python benchmarks/bench_attention.py --paths flash flex per_sequence sdpa --device cuda
    python benchmarks/bench_attention.py --runs                  # one run's attention: matmuls vs SDPA

A random-init LLaMA (hidden 256, 2 layers, 4 heads, 2 KV heads, vocab 49152) runs one packed row of the
given sequence lengths through `opd_local.hidden_states.final_hidden_states` with each path forced by
OPD_PACKED_ATTENTION (see opd_local/attention.py). "flex" is the trainer's path (compiled on CUDA, eager
on CPU); "flex_compiled" also compiles it on CPU. Prints the first call (compiles included; the warm-up)
and the median, p10/p90 and min of --repeats more, with the peak memory of the path's calls (harness.py).

--runs times `attention.run_attention` alone, forward + backward and forward only, with SmolLM2-135M's
heads (9 x 64) on (shared prefix, run) lengths like a GSM8K group's: explicit matmuls against SDPA, each
with its largest error against a float64 reference, after 3 warm-up calls, medians with p10-p90 and peak
memory beside them. It is what sets `attention.CPU_MATMUL_ATTENTION_MAX`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from harness import PeakMemory, Stats, print_header, time_rounds  # noqa: E402
from opd_local import attention  # noqa: E402
from opd_local.hidden_states import final_hidden_states  # noqa: E402
from opd_local.packing import pack_sequences  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[700, 300, 1000, 500, 800, 400, 396])
    parser.add_argument("--paths", nargs="+", default=["sdpa", "per_sequence", "flex", "flex_compiled"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", action="store_true", help="time one run's attention: explicit matmuls vs SDPA")
    parser.add_argument("--dtype", default="bfloat16", help="--runs: the inputs' dtype")
    args = parser.parse_args()
    if args.runs:
        return compare_run_attention(torch.device(args.device), getattr(torch, args.dtype), args.repeats)
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    config._attn_implementation = attention.PACKED_SDPA
    model = LlamaForCausalLM(config).eval().to(device)
    seqs = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in args.lengths]
    batch = pack_sequences([s[:1] for s in seqs], [s[1:] for s in seqs]).to(device)
    print_header("bench_attention", device, [
        f"T = {batch.input_ids.shape[1]} in {len(seqs)} sequences, one packed forward per call; the first call "
        f"(compiles included) is the warm-up, then --repeats {args.repeats} timed calls; peak memory over all of a path's calls"])
    with torch.no_grad():
        ref = torch.cat([model.get_decoder()(input_ids=torch.tensor([s], device=device), use_cache=False)
                         .last_hidden_state[0] for s in seqs])

    for name in args.paths:
        os.environ["OPD_PACKED_ATTENTION"] = "flex" if name == "flex_compiled" else name
        attention._compiled_flex.clear()
        if name == "flex_compiled":
            from torch.nn.attention.flex_attention import flex_attention

            attention._compiled_flex.append(torch.compile(flex_attention))
        with torch.no_grad(), PeakMemory(device) as peak:
            first = time_rounds(lambda: final_hidden_states(model, batch.input_ids, batch.position_ids), 1, warmup=0)
            hidden = first.results[0]
            timing = time_rounds(lambda: final_hidden_states(model, batch.input_ids, batch.position_ids), args.repeats,
                                 warmup=0)  # the first call above is the warm-up, timed: it holds the compiling
        stats = Stats.of(timing.seconds, warmup=1)
        print(f"{name}: first {first.seconds[0] * 1e3:.0f} ms, median {stats.median * 1e3:.1f} ms "
              f"(p10 {stats.p10 * 1e3:.1f}, p90 {stats.p90 * 1e3:.1f}), min {stats.low * 1e3:.1f} ms, "
              f"peak {peak.text()}, max |packed - unpacked| {(hidden[0] - ref).abs().max().item():.2e}", flush=True)


# (shared prefix, run) lengths: student prompts alone, completions behind them, privileged prompts, larger.
RUN_SHAPES = [(0, 116), (116, 100), (0, 248), (248, 100), (0, 400), (300, 200), (0, 512), (0, 768)]


def compare_run_attention(device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    heads, head_dim = 9, 64
    repeats = max(repeats, 10)
    print_header("bench_attention --runs", device, [
        f"one run's attention, {heads} heads x {head_dim}, {dtype}; {RUN_WARMUP} warm-up calls, then the median "
        f"of {repeats} (p10-p90 beside it); peak memory over a path's warm-up and timed forward + backward calls"])
    print("| prefix | run | Tq x Tk | sdpa fwd+bwd ms | matmul fwd+bwd ms | ratio | sdpa fwd ms | matmul fwd ms | ratio "
          "| max error sdpa | max error matmul | sdpa fwd+bwd p10-p90 ms | matmul fwd+bwd p10-p90 ms "
          "| sdpa fwd+bwd peak | matmul fwd+bwd peak |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for prefix, run in RUN_SHAPES:
        torch.manual_seed(0)
        q = torch.randn(1, heads, run, head_dim, device=device, dtype=dtype) * 2
        k = torch.randn(1, heads, prefix + run, head_dim, device=device, dtype=dtype) * 2
        v = torch.randn(1, heads, prefix + run, head_dim, device=device, dtype=dtype)
        grad = torch.randn_like(q)
        reference = attention.run_attention(q.double(), k.double(), v.double(), matmul=False)
        row = {}
        for matmul in (False, True):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            forward_backward = functools.partial(_forward_backward, leaves, grad, matmul)
            forward = functools.partial(_forward, (q, k, v), matmul)
            error = (forward().double() - reference).abs().max().item()
            with PeakMemory(device) as peak:
                both = time_rounds(forward_backward, repeats, warmup=RUN_WARMUP).stats
            row[matmul] = (both, time_rounds(forward, repeats, warmup=RUN_WARMUP).stats.median * 1e3, error, peak)
        (sb, sf, se, sp), (mb, mf, me, mp) = row[False], row[True]
        print(f"| {prefix} | {run} | {run * (prefix + run)} | {sb.median * 1e3:.2f} | {mb.median * 1e3:.2f} "
              f"| {sb.median / mb.median:.2f}x | {sf:.2f} | {mf:.2f} | {sf / mf:.2f}x | {se:.1e} | {me:.1e} "
              f"| {sb.spread(1e3, '.2f')} | {mb.spread(1e3, '.2f')} | {_mib(sp)} | {_mib(mp)} |", flush=True)


RUN_WARMUP = 3


def _mib(peak: PeakMemory) -> str:
    return f"{peak.bytes / 2**20:.1f} MiB" if peak.cuda else f"{peak.gib:.2f} GiB RSS"


def _forward_backward(leaves, grad, matmul: bool) -> None:
    attention.run_attention(*leaves, matmul=matmul).backward(grad)


@torch.no_grad()
def _forward(inputs, matmul: bool) -> torch.Tensor:
    return attention.run_attention(*inputs, matmul=matmul)


if __name__ == "__main__":
    main()

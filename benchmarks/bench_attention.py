"""Packed-row attention paths side by side: time of one packed forward, and packed vs unpacked hidden states.

    python benchmarks/bench_attention.py                         # CPU: sdpa (dense mask), per_sequence, flex
    python benchmarks/bench_attention.py --paths flash flex per_sequence sdpa --device cuda

A random-init LLaMA (hidden 256, 2 layers, 4 heads, 2 KV heads, vocab 49152) runs one packed row of the
given sequence lengths through `opd_local.models.final_hidden_states` with each path forced by
OPD_PACKED_ATTENTION (see opd_local/attention.py). "flex" is the trainer's path (compiled on CUDA, eager
on CPU); "flex_compiled" also compiles it on CPU. Prints the first call (compiles included) and the median
and min of --repeats more.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from opd_local import attention  # noqa: E402
from opd_local.models import final_hidden_states  # noqa: E402
from opd_local.packing import pack_sequences  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[700, 300, 1000, 500, 800, 400, 396])
    parser.add_argument("--paths", nargs="+", default=["sdpa", "per_sequence", "flex", "flex_compiled"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    config._attn_implementation = attention.PACKED_SDPA
    model = LlamaForCausalLM(config).eval().to(device)
    seqs = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in args.lengths]
    batch = pack_sequences([s[:1] for s in seqs], [s[1:] for s in seqs]).to(device)
    print(f"T = {batch.input_ids.shape[1]} in {len(seqs)} sequences, torch {torch.__version__}, {device}, "
          f"{torch.get_num_threads()} threads")
    with torch.no_grad():
        ref = torch.cat([model.get_decoder()(input_ids=torch.tensor([s], device=device), use_cache=False)
                         .last_hidden_state[0] for s in seqs])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for name in args.paths:
        os.environ["OPD_PACKED_ATTENTION"] = "flex" if name == "flex_compiled" else name
        attention._compiled_flex.clear()
        if name == "flex_compiled":
            from torch.nn.attention.flex_attention import flex_attention

            attention._compiled_flex.append(torch.compile(flex_attention))
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            hidden = final_hidden_states(model, batch.input_ids, batch.position_ids)
            sync()
            first = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                final_hidden_states(model, batch.input_ids, batch.position_ids)
                sync()
                times.append(time.perf_counter() - t0)
        times.sort()
        print(f"{name}: first {first * 1e3:.0f} ms, median {times[len(times) // 2] * 1e3:.1f} ms, "
              f"min {times[0] * 1e3:.1f} ms, max |packed - unpacked| {(hidden[0] - ref).abs().max().item():.2e}",
              flush=True)


if __name__ == "__main__":
    main()

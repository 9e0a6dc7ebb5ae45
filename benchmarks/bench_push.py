"""Weight push into the in-process vLLM engine, per model family: what a push and its checks cost, and what tells
a wrong push from rounding.

For each family (a tiny random-init model from tests/model_families.py, or the default SmolLM2-135M with
`--default`) and each engine dtype, one engine is built and the trainer's own weights are pushed:

- push seconds, parity-probe seconds (median of `--repeats` after `--warmup` untimed, with p10-p90), the
  start-up proof's seconds, and the peak resident memory of the row;
- the parity probe's max |Δlogprob| after a true push, and after each of three wrong pushes (an expert
  pushed with another's values where the model has experts, a square projection transposed, an
  expert's projection or a norm skipped), next to what the push proof says of each.

    python benchmarks/bench_push.py [--families llama,qwen3_moe] [--dtypes bfloat16,float32] [--default]
                                [--repeats 5] [--warmup 1]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness import PeakMemory, print_header, time_rounds  # noqa: E402
from opd_local import sync  # noqa: E402
from opd_local.config import Config, ModelConfig  # noqa: E402
from opd_local.models import load_causal_lm, load_tokenizer, merged_named_weights  # noqa: E402
from opd_local.precision import PARITY_THRESHOLDS  # noqa: E402
from opd_local.sync import StaleWeightsError, WeightPushError, parity_probe, prove_push, push_model_weights  # noqa: E402

ASSETS = ROOT / "tests" / "assets" / "smollm2-135m-instruct"


def faults(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Three wrong pushes built from the checkpoint tensors this family has."""
    names = list(shapes)
    experts = sorted(n for n in names if ".experts.1." in n and n.endswith(".weight"))
    square = next(n for n in names if len(shapes[n]) == 2 and shapes[n][0] == shapes[n][1] and ".layers." in n)
    skipped = experts[0] if experts else next(n for n in names if n.endswith("post_attention_layernorm.weight") or n.endswith("norm.weight"))
    chosen = {}
    if experts:
        other = experts[0].replace(".experts.1.", ".experts.0.")
        chosen["expert swapped"] = lambda ws: [(n, dict(ws)[other] if n == experts[0] else t) for n, t in ws]
    chosen["transposed"] = lambda ws: [(n, t.t() if n == square else t) for n, t in ws]
    chosen["skipped"] = lambda ws: [(n, t) for n, t in ws if n != skipped]
    return chosen


def measure(name: str, path: str, dtype: torch.dtype, attn: str, repeats: int, warmup: int) -> None:
    with PeakMemory("cpu") as peak:
        row, wrong_pushes = measure_row(name, path, dtype, attn, repeats, warmup)
    print(f"{row} {peak.gib:.2f} |{wrong_pushes} |", flush=True)


def measure_row(name: str, path: str, dtype: torch.dtype, attn: str, repeats: int, warmup: int) -> tuple[str, str]:
    """The row's cells up to the peak memory, and its wrong pushes' cell."""
    from opd_local.samplers.vllm import VLLMSampler

    tokenizer = load_tokenizer(str(ASSETS), ModelConfig())
    cfg = Config()
    cfg.rollout.max_model_len = 512
    engine = VLLMSampler(path, cfg, torch.device("cpu"), dtype)
    student = load_causal_lm(path, ModelConfig(attn_implementation=attn), torch.float32, torch.device("cpu"))
    probe = tokenizer(cfg.sync.probe_text)["input_ids"]
    limit = PARITY_THRESHOLDS[dtype]
    proof = prove_push(engine, student)["time/push_proof"]
    push = time_rounds(lambda: push_model_weights(engine, student), repeats, warmup).stats
    check = time_rounds(lambda: parity_probe(engine, student, probe, limit, dtype), repeats, warmup).stats
    true_parity = parity_probe(engine, student, probe, limit, dtype)["sync/parity_max_abs"]
    row = (f"| {name} | {str(dtype).removeprefix('torch.')} | {push.median:.3f} | {check.median:.3f} | {proof:.2f} "
           f"| {true_parity:.3g} | {push.spread()} | {check.spread()} |")
    wrong_pushes = ""
    layout = sync.checkpoint_layout
    shapes = {n: tuple(t.shape) for n, t in layout(student, merged_named_weights(student))}
    for fault, corrupt in faults(shapes).items():
        sync.checkpoint_layout = lambda model, weights, c=corrupt: c(list(layout(model, weights)))
        try:
            prove_push(engine, student)
            verdict = "passed"
        except WeightPushError as exc:
            verdict = "refused: " + str(exc).split("(")[1].split(")")[0]
        try:
            parity = f'{parity_probe(engine, student, probe, 1e9, dtype)["sync/parity_max_abs"]:.3g}'
        except StaleWeightsError:  # NaN: the skipped tensor still holds the proof's NaN
            parity = "nan"
        wrong_pushes += f" {fault}: parity {parity}, proof {verdict};"
        sync.checkpoint_layout = layout
    engine.close()
    gc.collect()
    return row, wrong_pushes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--families",
        default="llama,qwen2,qwen3,qwen3_moe,gemma3,gemma4,mistral,phi3,granite,gpt_oss,olmo2,olmo3,smollm3,"
        "qwen3_5,qwen3_5_hub,qwen3_next,granitemoehybrid,lfm2",
    )
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--default", action="store_true", help="the default SmolLM2-135M-Instruct instead")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed pushes and probes before the timed ones")
    args = parser.parse_args()
    from model_families import ATTN_IMPLEMENTATION, save_tiny_family

    print_header("bench_push", "cpu", [
        f"push and parity probe: {args.warmup} untimed call(s), then the median of {args.repeats}, p10-p90 beside it; "
        "the proof: one call; peak GiB: the process's peak RSS over a row (engine, student and every check)"])
    print("| family | engine dtype | push s | parity probe s | proof s | parity, true push | push p10-p90 s "
          "| probe p10-p90 s | peak GiB | wrong pushes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    tokenizer = load_tokenizer(str(ASSETS), ModelConfig())
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            if args.default:
                from opd_local.models import resolve_model_path

                model = Config().model
                measure("SmolLM2-135M", resolve_model_path(model.student, model), getattr(torch, dtype), "sdpa", args.repeats,
                        args.warmup)
                continue
            for name in args.families.split(","):
                path = Path(tmp) / name
                if not path.exists():
                    save_tiny_family(name, path, tokenizer, seed=0)
                measure(name, str(path), getattr(torch, dtype), ATTN_IMPLEMENTATION.get(name, "sdpa"), args.repeats,
                        args.warmup)


if __name__ == "__main__":
    main()

"""Engine-vs-trainer logprob agreement by precision: what sets `sync.parity_threshold` per engine dtype.

    python benchmarks/bench_parity.py [--groups 4] [--samples 4] [--max_tokens 128] [--logit_scales 1 4]

For each compute dtype (fp32; bf16: a bf16 engine and a bf16-autocast trainer over fp32 masters) and each
logit scale (the final norm multiplied by s, so logits grow s-fold and bf16 steps get coarser):
- |Δlogprob| on the parity probe right after a push (max, mean);
- |rollout_lp - trainer_lp| over real rollouts (max, p99, p50, mean): `rollout/trainer_lp_mismatch`;
- the probe's max |Δ| after one AdamW step at the default learning rate with the push skipped:
  what a stale engine looks like, which a threshold can catch only if it lies above the in-sync figures;
- the peak memory of each row. Nothing is timed (--repeats and --warmup are the shared workload's, unused).
"""

from __future__ import annotations

import argparse

import torch

from harness import PeakMemory, print_header
from opd_local.config import Config
from opd_local.optimizer import build_optimizer
from opd_local.models import load_causal_lm
from opd_local.precision import PARITY_THRESHOLDS, resolve_precision
from opd_local.packing import pack_sequences
from opd_local.scoring import packed_token_logprobs, score_completions
from opd_local.sync import push_model_weights
from opd_local.samplers.vllm import VLLMSampler
from workload import add_workload_args, load_workload


def probe_delta(engine, student, probe_ids, compute_dtype) -> torch.Tensor:
    engine_lp = torch.tensor(engine.score(probe_ids))
    (trainer_lp,) = score_completions(
        student, [probe_ids[:1]], [probe_ids[1:]], micro_batch_tokens=len(probe_ids), compute_dtype=compute_dtype
    ).logprobs
    return (engine_lp - trainer_lp).abs()


def measure(work, args, dtype_setting: str, scale: float) -> dict[str, float]:
    cfg: Config = work.cfg
    policy = resolve_precision(dtype_setting, work.device)
    student = load_causal_lm(work.model_path, cfg.model, policy.master, work.device)
    with torch.no_grad():
        student.get_decoder().norm.weight.mul_(scale)
    engine = VLLMSampler(work.model_path, cfg, work.device, policy.engine)
    push_model_weights(engine, student)
    probe_ids = work.tokenizer(cfg.sync.probe_text)["input_ids"]
    probe = probe_delta(engine, student, probe_ids, policy.compute)

    groups = engine.generate(work.prompts, n=args.samples, temperature=1.0, max_tokens=args.max_tokens, seed=0)
    prompts = [p for p, g in zip(work.prompts, groups) for _ in g]
    completions = [c.token_ids for g in groups for c in g]
    rollout_lp = torch.cat([torch.tensor(c.logprobs) for g in groups for c in g])
    trainer_lp = torch.cat(
        score_completions(student, prompts, completions, micro_batch_tokens=4096, compute_dtype=policy.compute).logprobs
    )
    mismatch = (rollout_lp - trainer_lp).abs()

    # One AdamW step at the default learning rate on the rollouts' own likelihood, push skipped.
    optimizer, _ = build_optimizer(student, cfg.optim)
    batch = pack_sequences(prompts, completions).to(work.device)
    (-packed_token_logprobs(student, batch, compute_dtype=policy.compute).sum()).backward()
    optimizer.step()
    stale = probe_delta(engine, student, probe_ids, policy.compute)
    engine.close()
    return {
        "probe_max": float(probe.max()), "probe_mean": float(probe.mean()),
        "roll_max": float(mismatch.max()), "roll_p99": float(mismatch.quantile(0.99)),
        "roll_p50": float(mismatch.median()), "roll_mean": float(mismatch.mean()),
        "tokens": int(mismatch.numel()), "stale_max": float(stale.max()), "stale_mean": float(stale.mean()),
        "engine": policy.engine_name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser, samples=4)
    parser.add_argument("--logit_scales", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="model.dtype settings")
    args = parser.parse_args()
    work = load_workload(args)
    print_header("bench_parity", work.device, [
        f"model {args.model}, lr {work.cfg.optim.lr}; {args.groups} prompts x {args.samples} samples, max_tokens "
        f"{args.max_tokens}; no timing (agreement only, so no warm-up); roll p50/p99: quantiles of "
        "|rollout_lp - trainer_lp| over the rollouts' tokens; peak GiB over the row (harness.PeakMemory: CUDA "
        "allocated above the start, or the process's peak RSS on CPU)"])
    print(f"{'engine':<9} {'scale':>5} {'probe max':>10} {'probe mean':>10} {'roll max':>9} {'roll p99':>9} "
          f"{'roll mean':>9} {'tokens':>6} {'stale max':>9} {'stale mean':>10} {'threshold':>9} {'roll p50':>9} "
          f"{'peak GiB':>8}")
    for setting in args.dtypes:
        for scale in args.logit_scales:
            with PeakMemory(work.device) as peak:
                r = measure(work, args, setting, scale)
            threshold = PARITY_THRESHOLDS[getattr(torch, r["engine"])]
            print(f"{r['engine']:<9} {scale:>5g} {r['probe_max']:>10.4f} {r['probe_mean']:>10.4f} {r['roll_max']:>9.4f} "
                  f"{r['roll_p99']:>9.4f} {r['roll_mean']:>9.4f} {r['tokens']:>6} {r['stale_max']:>9.4f} {r['stale_mean']:>10.4f} {threshold:>9g} "
                  f"{r['roll_p50']:>9.4f} {peak.gib:>8.2f}", flush=True)


if __name__ == "__main__":
    main()

"""torchrun on CPU (gloo): the update does not depend on how many ranks share the step."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file


def _run(tiny_model_dir, out, nproc):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    args = [
        "scripts/train.py", "--student", tiny_model_dir, "--sampler", "hf", "--steps", "2",
        "--groups_per_step", "4", "--samples_per_group", "2", "--max_tokens", "10", "--max_train_rows", "16",
        "--max_heldout_rows", "2", "--eval.every", "0", "--micro_batch_tokens", "700",
        # eps >> |grad| makes AdamW's step proportional to the gradient, so the comparison is of the
        # summed gradients themselves; with a small eps, Adam's first step is lr * sign(grad) and
        # a gradient that is zero up to rounding could flip sign between layouts.
        "--lr", "0.5", "--eps", "1.0",
        "--out_dir", str(out),
    ]
    subprocess.run(launcher + args, check=True, timeout=900, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, load_file(str(out / "final" / "model.safetensors"))


def test_two_ranks_match_one_rank(tiny_model_dir, tmp_path):
    one_records, one_weights = _run(tiny_model_dir, tmp_path / "one", 1)
    two_records, two_weights = _run(tiny_model_dir, tmp_path / "two", 2)
    for a, b in zip(one_records, two_records):
        # identical rollouts (seeded per group, not per rank) and a global N_active
        assert a["opd/active_tokens"] == b["opd/active_tokens"]
        assert a["groups/sampled"] == b["groups/sampled"] == 4
        assert abs(a["opd/sampled_reverse_kl"] - b["opd/sampled_reverse_kl"]) < 1e-5
        assert abs(a["opd/loss"] - b["opd/loss"]) < 1e-5
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    for name, weight in one_weights.items():
        assert not torch.equal(weight, start[name])
        # summation order differs between the layouts, so equal up to float32 rounding
        torch.testing.assert_close(two_weights[name], weight, atol=1e-6, rtol=1e-5, msg=name)

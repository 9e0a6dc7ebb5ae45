"""torchrun on CPU (gloo): the update does not depend on how many ranks share the step, nor on how they hold the model.

Tolerance: the layouts add the same per-token gradients in different orders (DDP sums the
ranks' accumulated gradients at the end, FSDP2 reduce-scatters every micro-batch), so after two
steps the weights agree to float32 rounding, |Δw| <= 1e-6 + 1e-5·|w| (measured: max |Δw| 1.2e-7).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_llama
from opd_local.checkpoint import checkpoint_problem
from opd_local.loop import train
from opd_local.metrics import read_metrics
from test_loop import tiny_config

COMMON = [
    "--sampler", "hf", "--steps", "2", "--groups_per_step", "4", "--samples_per_group", "2", "--max_tokens", "10",
    "--max_train_rows", "16", "--max_heldout_rows", "2", "--micro_batch_tokens", "700",
    # eps >> |grad| makes AdamW's step proportional to the gradient, so the comparison is of the
    # summed gradients themselves; with a small eps, Adam's first step is lr * sign(grad) and
    # a gradient that is zero up to rounding could flip sign between layouts.
    "--lr", "0.5", "--eps", "1.0",
    # fp32 on gloo, on any machine: the layouts are compared to fp32 rounding, which bf16 compute
    # would swamp, and 2 ranks need no 2 GPUs.
    "--dtype", "float32", "--run.device", "cpu",
]
EVAL = ["--eval.every", "2", "--eval.train_rows", "2", "--eval.max_trace_tokens", "8", "--eval.greedy_max_tokens", "8"]


def _torchrun(nproc, *args):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    subprocess.run(launcher + ["scripts/train.py", *args], check=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(tiny_model_dir, out, nproc, *extra):
    _torchrun(nproc, "--student", tiny_model_dir, *COMMON, "--out_dir", str(out), *extra)
    return _records(out), load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-rank")
    return out, *_run(tiny_model_dir, out, 1, *EVAL)


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_two_ranks_match_one_rank(one_rank, tiny_model_dir, tmp_path, layout):
    """Under fsdp the teacher is sharded too (teacher_placement=auto), and both ranks evaluate together."""
    one_dir, one_records, one_weights = one_rank
    out = tmp_path / layout
    two_records, two_weights = _run(tiny_model_dir, out, 2, *EVAL, "--parallel", layout, "--save_every", "2")
    assert [r["step"] for r in two_records] == [r["step"] for r in one_records] == [0, 1, 2]
    for a, b in zip(one_records, two_records):
        # identical rollouts (seeded per group, not per rank) and a global N_active
        assert a.get("opd/active_tokens") == b.get("opd/active_tokens")
        for key in ("opd/sampled_reverse_kl", "opd/loss", "eval/trace_gap", "eval/trace_gap_train"):
            assert (key in a) == (key in b) and abs(a.get(key, 0.0) - b.get(key, 0.0)) < 1e-5, key
    assert all(r["groups/sampled"] == 4 for r in two_records[:2])
    # one writer: rank 0's eval records only
    assert len((out / "trace_eval.jsonl").read_text().splitlines()) == len((one_dir / "trace_eval.jsonl").read_text().splitlines())
    assert (out / "checkpoints" / "step-000002" / "sharded").is_dir() == (layout == "fsdp")
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    assert one_weights.keys() == two_weights.keys()
    for name, weight in one_weights.items():
        assert not torch.equal(weight, start[name])
        torch.testing.assert_close(two_weights[name], weight, atol=1e-6, rtol=1e-5, msg=name)


def test_sharded_lora_run_resumes_from_its_shards(tiny_model_dir, tmp_path):
    """Under FSDP2, a resume from the step-1 checkpoint (each rank reads its own shards) redoes step 2 exactly.

    A full fine-tune of a model with tied embeddings (one storage, two names) is sharded, saved and
    resumed on one rank by test_checkpoint_resumes_on_another_number_of_ranks[fsdp-2-1-True].
    """
    full = tmp_path / "full"
    flags = ["--eval.every", "0", "--parallel", "fsdp", "--save_every", "1", "--lora_rank", "4", "--lora_alpha", "8"]
    records, weights = _run(tiny_model_dir, full, 2, *flags)
    assert all(r["sync/parity_max_abs"] < 1e-4 for r in records)  # the engines got the merged weights
    step_one = full / "checkpoints" / "step-000001"
    shards = sorted((step_one / "sharded").iterdir())
    assert shards and all(f.suffix == ".safetensors" for f in shards)  # nothing to unpickle on resume
    assert json.loads((step_one / "progress.json").read_text())["shards"] == [f.name for f in shards]
    assert len(shards) == 2  # one per rank
    damaged = tmp_path / "damaged"
    shutil.copytree(step_one, damaged / "step-000001")
    (damaged / "step-000001" / "sharded" / shards[1].name).unlink()  # what a lost file leaves: the rest would load partly
    assert checkpoint_problem(damaged / "step-000001") == f"{damaged / 'step-000001' / 'sharded' / shards[1].name}: missing"

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step-000002")
    (resumed / "checkpoints" / "latest").write_text("step-000001")
    _torchrun(2, "--resume", str(resumed))

    def strip(rs):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "sync/push"))} for r in rs]

    assert strip(_records(resumed)) == strip(records)
    again = load_file(str(resumed / "final" / "model.safetensors"))
    assert again.keys() == weights.keys()
    for name in weights:
        assert torch.equal(again[name], weights[name]), name


@pytest.fixture(scope="module")
def one_rank_tied(tokenizer, tmp_path_factory):
    """One rank, tied embeddings, a checkpoint after each step: what both 1 -> 2 resumes start from (one rank
    trains the whole model whatever run.parallel says)."""
    root = tmp_path_factory.mktemp("one-rank-tied")
    student = save_tiny_llama(root / "tied", tokenizer, seed=3, tied=True)
    return root / "full", *_run(student, root / "full", 1, "--eval.every", "0", "--parallel", "fsdp", "--save_every", "1")


@pytest.mark.parametrize(
    # FSDP both ways (2 -> 1: shards of a tied model; 1 -> 2: the whole-weights file holds one of the tied
    # weight's two names, which FSDP2 must fill in); DDP, which re-splits nothing, one way.
    "layout,before,after", [("fsdp", 2, 1), ("ddp", 1, 2), ("fsdp", 1, 2)]
)
def test_checkpoint_resumes_on_another_number_of_ranks(one_rank_tied, tokenizer, tmp_path, layout, before, after):
    """A run checkpointed by `before` ranks goes on with `after` (fewer GPUs after a failure, or more)
    and ends where the uninterrupted run ends, to the layouts' float32 tolerance: rollouts and the
    data cursor do not depend on the rank count, and sharded weights and AdamW state are re-split on load.
    A model with tied embeddings (one storage, two names) throughout."""
    if before == 1:
        full, records, weights = one_rank_tied
    else:
        student = save_tiny_llama(tmp_path / "tied", tokenizer, seed=3, tied=True)
        full = tmp_path / "full"
        records, weights = _run(student, full, before, "--eval.every", "0", "--parallel", layout, "--save_every", "1")
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step-000002")
    (resumed / "checkpoints" / "latest").write_text("step-000001")
    _torchrun(after, "--resume", str(resumed), "--parallel", layout)
    again_records = _records(resumed)
    assert [r["step"] for r in again_records] == [0, 1]
    assert again_records[1]["opd/active_tokens"] == records[1]["opd/active_tokens"]
    assert abs(again_records[1]["opd/loss"] - records[1]["opd/loss"]) < 1e-5
    again = load_file(str(resumed / "final" / "model.safetensors"))
    assert again.keys() == weights.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(again[name], weight, atol=1e-6, rtol=1e-5, msg=name)


def _step_beside_a_library_group(tiny_model_dir, out, backend, device):
    """One process, one step, a checkpoint and an eval, after a library started a default group of
    world size 1 (as vLLM's in-process worker does): the trainer must not communicate on it. On
    NCCL a CPU all-reduce fails outright; gloo would accept one, so its sequence number tells."""
    import torch.distributed as torch_dist

    torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        group = torch_dist.group.WORLD
        before = group._get_sequence_number_for_group()
        cfg = tiny_config(tiny_model_dir, out)
        cfg.run.steps, cfg.run.save_every, cfg.run.device = 1, 1, device
        cfg.eval.every, cfg.eval.train_rows, cfg.eval.max_trace_tokens, cfg.eval.greedy_max_tokens = 1, 1, 8, 8
        records = read_metrics(train(cfg))
        assert group._get_sequence_number_for_group() == before, "the trainer made a collective call on a group it did not start"
    finally:
        torch_dist.destroy_process_group()
    assert records[0]["opd/active_tokens"] > 0 and (out / "checkpoints" / "step-000001").is_dir()


def test_single_process_ignores_a_default_group_it_did_not_start(tiny_model_dir, tmp_path):
    _step_beside_a_library_group(tiny_model_dir, tmp_path / "run", "gloo", "cpu")


@pytest.mark.gpu
def test_single_gpu_ignores_a_default_nccl_group(tiny_model_dir, tmp_path):
    _step_beside_a_library_group(tiny_model_dir, tmp_path / "run", "nccl", "cuda")

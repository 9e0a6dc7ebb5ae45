"""Placement choices, and a teacher offloaded by accelerate scoring and pushing exactly like the plain one."""

import pytest
import torch

from opd_local import distributed
from opd_local.config import ModelConfig
from opd_local.models import load_frozen_teacher, merged_named_weights

CPU = torch.device("cpu")


def test_layout_resolution():
    assert distributed.resolve_layout("auto", 10**9, 10**9, 8) == "ddp"
    assert distributed.resolve_layout("auto", 10**9 + 1, 10**9, 8) == "fsdp"
    assert distributed.resolve_layout("fsdp", 10, 10**9, 2) == "fsdp"
    assert distributed.resolve_layout("fsdp", 10, 10**9, 1) == "none"  # one process trains the whole model
    with pytest.raises(ValueError, match="run.parallel=none with 2 ranks"):
        distributed.resolve_layout("none", 10, 10**9, 2)
    with pytest.raises(ValueError, match="choose one of"):
        distributed.resolve_layout("zero3", 10, 10**9, 2)


def test_teacher_placement_resolution():
    assert distributed.resolve_teacher_placement("auto", "fsdp", CPU) == "shard"
    assert distributed.resolve_teacher_placement("auto", "ddp", CPU) == "replica"
    with pytest.raises(ValueError, match="needs a sharded student"):
        distributed.resolve_teacher_placement("shard", "ddp", CPU)
    with pytest.raises(ValueError, match="from a GPU"):
        distributed.resolve_teacher_placement("cpu", "none", CPU)


def test_offloaded_teacher_scores_and_pushes_like_the_plain_one(tiny_teacher_dir, tokenizer, tmp_path):
    """Layers on disk (the CPU stand-in for host memory: the same accelerate hooks, one layer loaded at a time)."""
    plain = load_frozen_teacher(tiny_teacher_dir, ModelConfig(), torch.float32, CPU)
    offloaded = distributed.place_teacher(
        load_frozen_teacher(tiny_teacher_dir, ModelConfig(), torch.float32, CPU), "disk", CPU, str(tmp_path / "offload")
    )
    assert all(p.device.type == "meta" for p in offloaded.model.layers.parameters())  # nothing resident
    assert offloaded.lm_head.weight.device == CPU  # read directly by the scoring pass, so kept in place
    prompts = [tokenizer("Tom has 3 apples.")["input_ids"], tokenizer("2+2?")["input_ids"]]
    completions = [tokenizer(" He buys 5 more: 8.")["input_ids"], tokenizer(" 4")["input_ids"]]
    want = distributed.score_completions_distributed(plain, prompts, completions, micro_batch_tokens=16).logprobs  # two micro-batches
    got = distributed.score_completions_distributed(offloaded, prompts, completions, micro_batch_tokens=16).logprobs
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
    plain_weights = dict(merged_named_weights(plain))
    pushed = dict(distributed.gather_engine_weights(offloaded))
    assert pushed.keys() == plain_weights.keys()
    for name, weight in plain_weights.items():
        assert torch.equal(pushed[name], weight), name
    assert all(p.device.type == "meta" for p in offloaded.model.layers.parameters())  # offloaded again


@pytest.mark.gpu
def test_cpu_placed_teacher_copies_from_pinned_memory(tiny_teacher_dir, tokenizer):
    """Host-memory layers are page-locked, so their per-forward copy to the GPU is a direct DMA; scores unchanged."""
    gpu = torch.device("cuda")
    plain = load_frozen_teacher(tiny_teacher_dir, ModelConfig(), torch.float32, CPU).to(gpu)
    offloaded = distributed.place_teacher(load_frozen_teacher(tiny_teacher_dir, ModelConfig(), torch.float32, CPU), "cpu", gpu, "")
    hooks = [m._hf_hook for m in offloaded.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    # Every hook reads from one accelerate loader; its state dict holds the host copies.
    host = [t for hook in hooks for t in hook.weights_map.dataset.state_dict.values()]
    assert host and all(t.is_pinned() for t in host)
    prompts, completions = [tokenizer("Tom has 3 apples.")["input_ids"]], [tokenizer(" He buys 5 more: 8.")["input_ids"]]
    (want,) = distributed.score_completions_distributed(plain, prompts, completions, micro_batch_tokens=64).logprobs
    (got,) = distributed.score_completions_distributed(offloaded, prompts, completions, micro_batch_tokens=64).logprobs
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

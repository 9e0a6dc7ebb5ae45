"""The push proof: after the engine's weights are overwritten with NaN, a push of the weights it loaded must give
back every one of them bit for bit. A push that corrupts an expert, transposes a tensor or skips one fails it,
under bf16 as under fp32, naming the engine tensor; the parity probe alone passes such pushes under bf16."""

import pytest
import torch

from opd_local import sync
from opd_local.config import Config, ModelConfig
from opd_local.models import load_causal_lm
from opd_local.precision import PARITY_THRESHOLDS
from opd_local.samplers.hf import HFSampler
from opd_local.sync import WeightPushError, prove_push


def _swap_expert(weights):
    """Expert 2's down projection pushed with expert 3's values."""
    weights = dict(weights)
    weights["model.layers.1.mlp.experts.2.down_proj.weight"] = weights["model.layers.1.mlp.experts.3.down_proj.weight"]
    return weights.items()


def _transpose(weights):
    return [(n, t.t() if n == "model.layers.0.self_attn.q_proj.weight" else t) for n, t in weights]


def _skip(weights):
    return [(n, t) for n, t in weights if n != "model.layers.1.mlp.experts.0.up_proj.weight"]


FAULTS = {
    "corrupted expert": (_swap_expert, "model.layers.1.mlp.experts.routed_experts.w2_weight"),
    "transposed tensor": (_transpose, "model.layers.0.self_attn.qkv_proj.weight"),
    "skipped tensor": (_skip, "model.layers.1.mlp.experts.routed_experts.w13_weight"),
}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def moe_engine(request, family_dir):
    pytest.importorskip("vllm")
    from opd_local.samplers.vllm import VLLMSampler

    cfg = Config()
    cfg.rollout.max_model_len = 256
    sampler = VLLMSampler(family_dir("qwen3_moe"), cfg, torch.device("cpu"), request.param)
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def moe_student(family_dir):
    return load_causal_lm(family_dir("qwen3_moe"), ModelConfig(), torch.float32, torch.device("cpu"))


@pytest.mark.vllm
def test_a_faulty_push_fails_the_proof_and_a_true_one_passes(moe_engine, moe_student, monkeypatch, tokenizer):
    layout = sync.checkpoint_layout
    probe = tokenizer(Config().sync.probe_text)["input_ids"]
    for fault, (corrupt, engine_name) in FAULTS.items():
        monkeypatch.setattr(sync, "checkpoint_layout", lambda model, weights, c=corrupt: c(layout(model, weights)))
        with pytest.raises(WeightPushError, match=rf"other values in [12] tensors \([^)]*{engine_name}"):
            prove_push(moe_engine, moe_student)
        if fault == "corrupted expert" and moe_engine.dtype == torch.bfloat16:
            # What the proof exists for: the bf16 parity limit does not see this push.
            limit = PARITY_THRESHOLDS[torch.bfloat16]
            assert sync.parity_probe(moe_engine, moe_student, probe, limit, torch.bfloat16)["sync/parity_max_abs"] <= limit
    monkeypatch.setattr(sync, "checkpoint_layout", layout)
    assert prove_push(moe_engine, moe_student)["time/push_proof"] > 0
    tight = 2e-3 if moe_engine.dtype == torch.float32 else PARITY_THRESHOLDS[torch.bfloat16]
    assert sync.parity_probe(moe_engine, moe_student, probe, tight, moe_engine.dtype)["sync/parity_max_abs"] <= tight


def test_the_proof_holds_for_the_transformers_engine(tiny_model_dir, tokenizer, monkeypatch):
    engine = HFSampler.load(tiny_model_dir, ModelConfig(), torch.device("cpu"), tokenizer.eos_token_id, tokenizer.pad_token_id)
    student = load_causal_lm(tiny_model_dir, ModelConfig(), torch.float32, torch.device("cpu"))
    assert prove_push(engine, student)["time/push_proof"] > 0
    gather = sync.gather_engine_weights
    monkeypatch.setattr(
        sync, "gather_engine_weights",
        lambda model: ((n, t.flip(0) if n == "model.layers.1.mlp.down_proj.weight" else t) for n, t in gather(model)),
    )
    with pytest.raises(WeightPushError, match=r"other values in 1 tensors \(model.layers.1.mlp.down_proj.weight\)"):
        prove_push(engine, student)

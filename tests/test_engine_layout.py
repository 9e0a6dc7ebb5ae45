"""The push's tensors are the checkpoint's: for every family, the trainer's weights in checkpoint layout equal,
name for name and bit for bit, the safetensors the model was saved as (what vLLM loads)."""

from pathlib import Path

import pytest
import torch
from model_families import ATTN_IMPLEMENTATION, FAMILIES
from safetensors.torch import load_file

from opd_local.config import ModelConfig
from opd_local.samplers.engine_layout import checkpoint_layout
from opd_local.models import apply_lora, load_causal_lm, merged_named_weights

# Checkpoint tensors the trainer does not hold: the hub layout's vision tower (the trainer loads the text model).
NOT_TRAINED = {"qwen3_5_hub": "model.visual."}


def _checkpoint(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("name", list(FAMILIES))
def test_checkpoint_layout_is_the_saved_checkpoint(name, family_dir):
    path = family_dir(name)
    model = load_causal_lm(path, ModelConfig(attn_implementation=ATTN_IMPLEMENTATION.get(name, "sdpa")), torch.float32, torch.device("cpu"))
    pushed = list(checkpoint_layout(model, merged_named_weights(model)))
    names = [n for n, _ in pushed]
    assert len(names) == len(set(names))
    saved = {k: v for k, v in _checkpoint(path).items() if not k.startswith(NOT_TRAINED.get(name, "\0"))}
    # A tied lm_head is pushed under its own name too (save_pretrained writes the embedding alone).
    storage = {t.data_ptr(): n for n, t in pushed if n in saved}
    aliases = {n for n, t in pushed if n not in saved and t.data_ptr() in storage}
    assert sorted(set(names) - aliases) == sorted(saved)
    unequal = [n for n, t in pushed if n not in aliases and not torch.equal(t, saved[n])]
    assert not unequal


def test_merged_lora_weights_take_the_checkpoint_layout(family_dir):
    """A LoRA student of a fused-expert family: the adapter is merged, then the experts are split per expert."""
    path = family_dir("qwen3_moe")
    cfg = ModelConfig(lora_rank=4, lora_target_modules="q_proj,v_proj")
    student = apply_lora(load_causal_lm(path, cfg, torch.float32, torch.device("cpu")), cfg)
    with torch.no_grad():
        for module in student.modules():
            if hasattr(module, "lora_B"):
                module.lora_B["default"].weight.normal_()
    pushed = dict(checkpoint_layout(student.get_base_model(), merged_named_weights(student)))
    saved = _checkpoint(path)
    assert sorted(pushed) == sorted(saved)
    moved = {n for n in pushed if not torch.equal(pushed[n], saved[n])}
    assert moved == {n for n in saved if n.endswith(("q_proj.weight", "v_proj.weight"))}

"""The weight push's checksums: one per pushed name, each the sum of the bit patterns the engine stores."""

from __future__ import annotations

import torch
from conftest import save_tiny_llama

from opd_local.config import ModelConfig
from opd_local.models import load_causal_lm
from opd_local.samplers.hf import HFSampler
from opd_local.sync import _tied_storages, push_model_weights


def test_tied_weights_are_pushed_and_checksummed_under_every_name(tmp_path, tokenizer):
    path = save_tiny_llama(tmp_path, tokenizer, seed=3, tied=True)
    student = load_causal_lm(path, ModelConfig(), torch.float32, torch.device("cpu"))
    engine = HFSampler.load(path, ModelConfig(), torch.device("cpu"), tokenizer.eos_token_id, tokenizer.pad_token_id, torch.bfloat16)
    assert len(_tied_storages(student)) == 1  # the embedding, also the lm_head
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    digests: list[torch.Tensor] = []
    push_model_weights(engine, student, digests)
    names = [name for name, _ in student.named_parameters(remove_duplicate=False)]
    expected = [
        p.detach().to(torch.bfloat16).view(torch.int16).sum(dtype=torch.int64)
        for _, p in student.named_parameters(remove_duplicate=False)
    ]
    assert len(digests) == len(names) and "lm_head.weight" in names
    assert torch.equal(torch.stack(digests), torch.stack(expected))
    engine_params = dict(engine.model.named_parameters(remove_duplicate=False))
    for name, p in student.named_parameters(remove_duplicate=False):
        assert torch.equal(engine_params[name], p.detach().to(torch.bfloat16)), name

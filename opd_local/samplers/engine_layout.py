"""The trainer's weights under the names and layouts of the model's checkpoint, which is what vLLM loads.

transformers 5 may hold a model's weights in another layout than its checkpoint: Qwen3-MoE's experts as
one fused [E, 2I, H] `gate_up_proj` where the checkpoint has a `gate_proj` and an `up_proj` per expert,
Granite 4's Mamba layers under other names, Qwen 3.5's hub checkpoint under `model.language_model.`.
`save_pretrained` undoes that with the conversions recorded at load (`revert_weight_conversion`); the push
undoes it the same way, one decoder layer at a time so that a sharded model is still gathered one
layer at a time. Whether the result covers the engine is proven on the engine itself (`sync.prove_push`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

# The group a tensor is reverted with: its decoder layer ("model.layers.3"), or the tensor alone.
_LAYER_PREFIX = re.compile(r"^(.*?\.\d+)\.")


def checkpoint_layout(model, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """`named_tensors` (module names of `model`, a transformers model) as the checkpoint names them.

    Conversions join tensors of one layer only (the experts of one MoE block), so each layer's
    tensors are reverted together as they arrive, in order."""
    from transformers.core_model_loading import revert_weight_conversion

    group_key, group = None, {}
    for name, tensor in named_tensors:
        match = _LAYER_PREFIX.match(name)
        key = match.group(1) if match else name
        if key != group_key and group:
            yield from revert_weight_conversion(model, group).items()
            group = {}
        group_key = key
        group[name] = tensor
    if group:
        yield from revert_weight_conversion(model, group).items()

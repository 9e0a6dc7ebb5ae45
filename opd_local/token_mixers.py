"""Recurrent and convolutional token mixers on packed rows: each sequence on its own (docs/design.md,
"Facts about the engines", Packed forwards).

Gated DeltaNet (Qwen 3.5, Qwen3-Next), Mamba2 (Granite 4) and short convolutions (LFM2) carry a state
along the row. transformers' CPU code for them (`torch_chunk_gated_delta_rule`, `causal_conv1d_fn`, Mamba2's
`torch_forward`) ignores `cu_seqlens` and `seq_idx`, so in a packed row every sequence would start from
the state its neighbour left. `split_token_mixers` makes each such layer of a model run one sequence of
the row at a time while a packed row is running (`attention.packed_row`), and leaves it untouched
otherwise (generation, a cache, padded batches).

A completion that shares its prompt (`packing.pack_groups`) is run behind a copy of the prompt's inputs
to that layer and keeps only its own outputs: the layer sees exactly the tokens of its own sequence,
and the prompt's inputs are the same for every completion because the layers before are per-token or
already split. Only these layers pay for the prompt again; attention and the MLPs still see it once.
"""

from __future__ import annotations

import types

import torch

from opd_local.attention import current_row, row_layout

# Class-name parts of the layers that carry a state along the sequence. A layer found neither here nor
# by its Conv1d is still caught by the start-up check (`packing_check`), which then packs no more.
RECURRENT_NAME_PARTS = ("DeltaNet", "Mamba", "ShortConv", "Mixer", "LinearAttention", "Recurrent", "Rwkv", "SSM", "Ssm")
# Arguments that describe the whole row's layout: a per-sequence call gets none of them. Other per-token
# arguments (position ids, rotary embeddings) are cut to the sequence's tokens.
ROW_KWARGS = ("attention_mask", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
CACHE_KWARGS = ("cache_params", "past_key_values", "past_key_value", "cache")


def is_token_mixer(module: torch.nn.Module) -> bool:
    """A layer that mixes tokens through a state or a convolution: its class name says so, or it holds a Conv1d."""
    name = type(module).__name__
    if "Attention" in name and "Linear" not in name:
        return False
    if any(part in name for part in RECURRENT_NAME_PARTS):
        return True
    return any(isinstance(child, torch.nn.Conv1d) for child in module.children())


def _token_mixers(layers):
    return [child for layer in layers for child in layer.children() if is_token_mixer(child)]


def split_token_mixers(layers) -> None:
    """Make every token mixer of the decoder `layers` (`models.decoder_layers`) run per sequence on packed rows."""
    for mixer in _token_mixers(layers):
        if not getattr(mixer, "_opd_per_sequence", False):
            mixer.forward = types.MethodType(_per_sequence_forward, mixer)
            mixer._opd_per_sequence = True


def token_mixer_types(layers) -> list[str]:
    """The class names of the layers `split_token_mixers` splits among the decoder `layers`."""
    return sorted({type(mixer).__name__ for mixer in _token_mixers(layers)})


def _per_sequence_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    forward = type(self).forward
    position_ids = current_row(hidden_states.shape[1]) if hidden_states.dim() == 3 else None
    cached = any(kwargs.get(name) is not None for name in CACHE_KWARGS)
    if position_ids is None or cached or args or hidden_states.shape[0] != 1:
        return forward(self, hidden_states, *args, **kwargs)
    runs = row_layout(position_ids)
    if len(runs) == 1:
        return forward(self, hidden_states, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in ROW_KWARGS}
    length = hidden_states.shape[1]
    outputs = []
    for run in runs:
        inputs = _sequence_tokens(hidden_states, length, run)
        output = forward(self, inputs, **{k: _sequence_tokens(v, length, run) for k, v in kwargs.items()})
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"{type(self).__name__} returned {type(output).__name__}; opd-local splits only layers returning a tensor")
        outputs.append(output[:, inputs.shape[1] - (run[1] - run[0]) :])
    return torch.cat(outputs, dim=1)


def _sequence_tokens(value, length: int, run: tuple[int, int, int, int]):
    """A per-token `[1, T, ...]` tensor (or a tuple of them) cut to one run's tokens, behind its prompt's when it
    shares one; anything else as it is."""
    if isinstance(value, tuple):
        return tuple(_sequence_tokens(v, length, run) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[0] != 1 or value.shape[1] != length:
        return value
    start, end, prefix_start, prefix_end = run
    if prefix_end > prefix_start:
        return torch.cat([value[:, prefix_start:prefix_end], value[:, start:end]], dim=1)
    return value[:, start:end]

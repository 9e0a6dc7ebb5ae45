"""Attention for packed rows without an O(T^2) mask: every packed forward (steps 4-5) goes through here.

For `sdpa`, transformers turns a packed row's restarting `position_ids` into a dense [T, T] block-diagonal
mask, which costs O(T^2) memory per layer and keeps SDPA off its flash kernel. The models are loaded
with `PACKED_SDPA` instead: its mask function builds no mask for a packed row (no padding mask, no cache),
and its attention function runs each sequence on its own, through
- `flash_attention_2` on CUDA when flash-attn is installed (transformers' varlen path, from position_ids);
- else `flex_attention` on CUDA, with a block-sparse mask of the sequences (compiled once, by us);
- else plain SDPA one sequence at a time (`is_causal`, no mask: the flash kernel on CUDA).
The path can be forced with OPD_PACKED_ATTENTION=flash|flex|per_sequence|sdpa (sdpa: transformers' dense
mask, the old behaviour). Anything else (padding masks, a KV cache: generation, shared-prefix scoring) is
handed to transformers' own SDPA code unchanged.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "opd_packed_sdpa"
PATHS = ("flash", "flex", "per_sequence", "sdpa")
# On the CPU, one SDPA call per sequence is the fastest: `python benchmarks/bench_attention.py` (2 cores,
# torch 2.13, T = 4096 in 7 sequences, median of 5, two runs, 2026-11-29) gave 85-88 ms a forward, against
# 319-322 ms for the dense mask, 241-258 ms for flex compiled (after a first call of 2-22 s, with and
# without inductor's cache) and 1655-1752 ms for flex eager.
CPU_PATH = "per_sequence"


def packed_path(device: torch.device) -> str:
    forced = os.environ.get("OPD_PACKED_ATTENTION", "")
    if forced:
        if forced not in PATHS:
            raise ValueError(f"OPD_PACKED_ATTENTION={forced!r}; choose one of {', '.join(PATHS)}")
        return forced
    if device.type != "cuda":
        return CPU_PATH
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash"
    return "flex" if _flex_attention() is not None else "per_sequence"


def uses_sliding_window(config) -> bool:
    """Whether some layer attends through a window (Mistral, Gemma): then the mask carries it, so it is kept."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return any("sliding" in str(t) or "chunked" in str(t) for t in layer_types)
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False


def _packed_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """No mask for one row without padding or cache (possibly packed: the attention splits it); else sdpa's
    (which also detects packing in a batch of several rows)."""
    plain = batch_size == 1 and attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0
    plain = plain and not uses_sliding_window(kwargs.get("config"))
    if plain and packed_path(kwargs.get("device") or torch.device("cpu")) != "sdpa":
        return None
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        attention_mask=attention_mask, **kwargs,
    )


# Sequence boundaries of the last packed row seen: every layer of one forward gets the same position_ids
# tensor, so the host reads them once per forward, not once per layer.
_bounds_cache: list = [None, None]


def sequence_bounds(position_ids: torch.Tensor) -> list[int]:
    """[0, end_1, ..., T] of the sequences in one row: a new one starts wherever the position does not go up by 1."""
    if _bounds_cache[0] is position_ids:
        return _bounds_cache[1]
    pos = position_ids[0]
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    bounds = [0, *starts.tolist(), pos.shape[0]]
    _bounds_cache[:] = [position_ids, bounds]
    return bounds


def _flex_attention():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return flex_attention


_compiled_flex = []
_flex_failed: list = []


def _flex(query, key, value, bounds, scaling):
    from torch.nn.attention.flex_attention import create_block_mask

    if not _compiled_flex:
        # Compiled once for every model (transformers recompiles whenever a module's training flag changes).
        flex = _flex_attention()
        _compiled_flex.append(torch.compile(flex) if query.is_cuda else flex)
    t = query.shape[2]
    lengths = torch.tensor([e - s for s, e in zip(bounds, bounds[1:])], device=query.device)
    seq_id = torch.repeat_interleave(torch.arange(len(lengths), device=query.device), lengths)

    def causal_within_sequence(b, h, q_idx, kv_idx):
        return (seq_id[q_idx] == seq_id[kv_idx]) & (q_idx >= kv_idx)

    # Compiled on CUDA so that the [T, T] predicate is never materialised, only its [T/128, T/128] block map.
    block_mask = create_block_mask(causal_within_sequence, None, None, t, t, device=query.device, _compile=query.is_cuda)
    groups = query.shape[1] // key.shape[1]
    return _compiled_flex[0](query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=groups > 1)


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] of one packed row -> [1, T, Hq, D], like transformers' sdpa."""
    position_ids = kwargs.get("position_ids")
    path = packed_path(query.device)
    plain = attention_mask is None and query.shape[2] == key.shape[2] and query.shape[0] == 1
    if not plain or position_ids is None or path == "sdpa":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if path == "flash":
        from transformers.integrations.flash_attention import flash_attention_forward

        return flash_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    bounds = sequence_bounds(position_ids)
    if path == "flex" and not _flex_failed:
        if dropout:
            raise ValueError("flex_attention takes no attention dropout; set OPD_PACKED_ATTENTION=per_sequence")
        try:
            return _flex(query, key, value, bounds, scaling).transpose(1, 2).contiguous(), None
        except Exception as exc:  # a torch/triton pair whose flex compile fails: same math, one call per sequence
            _flex_failed.append(exc)
            warnings.warn(f"flex_attention failed ({type(exc).__name__}: {exc}); packed rows now run one SDPA call "
                          "per sequence", stacklevel=2)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=True
            )
            for s, e in zip(bounds, bounds[1:])
        ],
        dim=2,
    )  # [1, Hq, T, D]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
AttentionMaskInterface.register(PACKED_SDPA, _packed_mask)


def model_attention(name: str) -> str:
    """The transformers implementation to load for the configured one: `sdpa` becomes `PACKED_SDPA`."""
    return PACKED_SDPA if name == "sdpa" else name

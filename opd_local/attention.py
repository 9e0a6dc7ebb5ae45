"""Attention for packed rows without an O(T^2) mask: every packed forward (steps 4-5) goes through here.

For `sdpa`, transformers turns a packed row's restarting `position_ids` into a dense [T, T] block-diagonal
mask, which costs O(T^2) memory per layer and keeps SDPA off its flash kernel. The models are loaded
with `PACKED_SDPA` instead: its mask function builds no mask for a packed row (no padding mask, no cache),
and its attention function runs each sequence on its own, through
- `flash_attention_2` on CUDA when flash-attn is installed (transformers' varlen path, from position_ids);
- else `flex_attention` on CUDA, with a block-sparse mask of the sequences (compiled once, by us);
- else plain SDPA one sequence at a time (`is_causal`, no mask: the flash kernel on CUDA).
A student row may also hold a group's completions behind one copy of their prompt (`packing.pack_groups`):
each completion attends to the prompt and to itself, never to a sibling. `row_layout` reads that from the
position ids; flex takes it into its block mask, the per-sequence path attends each completion to the
prompt's keys and its own, and flash-attn (whole sequences only) hands such rows to the per-sequence path.
eager, plain sdpa and sliding windows get the same layout as a dense mask (`packed_row_mask`).
The path can be forced with OPD_PACKED_ATTENTION=flash|flex|per_sequence|sdpa (sdpa: one dense layout
mask through SDPA). Anything else (padding masks, a KV cache: generation, shared-prefix scoring) is
handed to transformers' own SDPA code unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
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


# The position ids of the packed row whose forward is running (`packed_row`). Layers that are not handed
# `position_ids` read the row's layout here: a model may keep them from its attention or its mask builder
# (GraniteMoeHybrid, GptOss), and recurrent and convolutional layers never take them (`token_mixers`).
_current_row: contextvars.ContextVar = contextvars.ContextVar("opd_packed_row", default=None)


@contextlib.contextmanager
def packed_row(position_ids: torch.Tensor):
    """While a packed row `[1, T]` runs through a model without a cache, its layers can read its layout."""
    token = _current_row.set(position_ids)
    try:
        yield
    finally:
        _current_row.reset(token)


def current_row(length: int) -> torch.Tensor | None:
    """The running packed row's position ids when the caller sees all `length` of its tokens, else None."""
    position_ids = _current_row.get()
    return position_ids if position_ids is not None and position_ids.shape[-1] == length else None


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


# The layout of the last packed row seen: every layer of one forward gets the same position_ids
# tensor, so the host reads them once per forward, not once per layer.
_layout_cache: list = [None, None]


def row_layout(position_ids: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """`(start, end, prefix_start, prefix_end)` per run of one packed row: its queries attend causally
    to the run itself and to all of `[prefix_start, prefix_end)`.

    A run is a stretch where the position goes up by 1. One that starts at position 0 begins a new
    sequence and has no prefix; one that starts at p > 0 is a completion sharing the prompt of the
    sequence before it (`packing.pack_groups`): its prefix is that sequence's first p tokens.
    """
    if _layout_cache[0] is position_ids:
        return _layout_cache[1]
    pos = position_ids[0]
    starts = torch.cat([pos.new_zeros(1), torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1])
    host = torch.cat([starts, pos[starts]]).tolist()  # one read: where each run starts, and at which position
    bounds, first_positions = host[: len(host) // 2] + [pos.shape[0]], host[len(host) // 2 :]
    runs = []
    head_start = head_end = head_first = 0  # the run that began the current sequence
    for index, (start, end, first) in enumerate(zip(bounds, bounds[1:], first_positions)):
        if first == 0 or index == 0:  # a row may also begin mid-sequence: then it is a plain causal run
            head_start, head_end, head_first = start, end, first
            runs.append((start, end, start, start))
            continue
        if head_first != 0 or first > head_end - head_start:
            raise ValueError(
                f"packed row: the run at {start} continues from position {first}, but its sequence's first run "
                f"does not hold positions 0..{first - 1}"
            )
        runs.append((start, end, head_start, head_start + first))
    _layout_cache[:] = [position_ids, runs]
    return runs


def has_shared_prefix(runs: list[tuple[int, int, int, int]]) -> bool:
    return any(prefix_end > prefix_start for _, _, prefix_start, prefix_end in runs)


def _layout_vectors(runs, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query token: where its run starts, and its prefix's [start, end)."""
    lengths = torch.tensor([end - start for start, end, _, _ in runs], device=device)
    per_run = torch.tensor([[start, ps, pe] for start, _, ps, pe in runs], device=device)
    run_start, prefix_start, prefix_end = torch.repeat_interleave(per_run, lengths, dim=0).unbind(1)
    return run_start, prefix_start, prefix_end


def _may_attend(q_idx, kv_idx, run_start, prefix_start, prefix_end):
    """True where query `q_idx` sees key `kv_idx`: causally within its own run, or anywhere in its prefix.
    The dense mask broadcasts it over [T, T]; flex evaluates it per block."""
    own = (kv_idx >= run_start) & (kv_idx <= q_idx)
    return own | ((kv_idx >= prefix_start) & (kv_idx < prefix_end))


def layout_mask(position_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """The row's dense `[1, 1, T, T]` bool mask, True where a query may attend a key; with `window`, only
    keys fewer than `window` positions back (transformers' sliding window, counted in sequence positions,
    so a completion's window reaches into its shared prompt as it would in its own sequence)."""
    t = position_ids.shape[1]
    run_start, prefix_start, prefix_end = _layout_vectors(row_layout(position_ids), position_ids.device)
    q = torch.arange(t, device=position_ids.device)[:, None]
    kv = torch.arange(t, device=position_ids.device)[None, :]
    mask = _may_attend(q, kv, run_start[:, None], prefix_start[:, None], prefix_end[:, None])
    if window is not None:
        pos = position_ids[0]
        mask &= (pos[:, None] - pos[None, :]) < window
    return mask[None, None]


def supports_shared_prefix(config) -> bool:
    """Whether a model's attention can run rows whose completions share a prompt: it reads the layout from
    the row (`PACKED_SDPA`) or takes it as a dense mask (sdpa, eager). flash_attention_2 sees only whole
    sequences."""
    return config._attn_implementation in (PACKED_SDPA, "sdpa", "eager")


def _attention_layer_types(config) -> set[str]:
    return {str(t) for t in (getattr(config, "layer_types", None) or []) if "attention" in str(t) and "linear" not in str(t)}


def packed_row_mask(config, position_ids: torch.Tensor, dtype: torch.dtype, shared_prefix: bool):
    """What a packed row passes as `attention_mask`; `shared_prefix` says whether completions share a prompt.

    None where the attention reads the row's layout itself (`PACKED_SDPA` without a window) or takes
    whole sequences from the position ids (flash_attention_2; a shared prompt is refused there). Else the
    layout as a dense mask, bool for sdpa and additive in `dtype` for eager (which adds it), windowed for
    sliding layers: one `[1, 1, T, T]` tensor when every attention layer sees the same mask, else a dict
    by layer type, which the models with mixed layer types take in place of building their own. Either
    way transformers' own packed-sequence detection is not relied on: it needs `position_ids` at the mask
    builder, which some models never hand it, and it takes a shared prompt's completions for new sequences.
    """
    implementation = config._attn_implementation
    windowed = uses_sliding_window(config)
    if implementation == PACKED_SDPA and packed_path(position_ids.device) != "sdpa" and not windowed:
        return None
    if not supports_shared_prefix(config):
        if shared_prefix:
            raise ValueError(f"attn_implementation={implementation}: cannot attend a shared prompt's completions")
        return None
    window = getattr(config, "sliding_window", None)
    if any("chunked" in t for t in _attention_layer_types(config)):
        raise ValueError("chunked attention layers: opd-local has no packed layout for them")

    def as_mask(mask: torch.Tensor) -> torch.Tensor:
        if implementation == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        return mask

    layer_types = _attention_layer_types(config)
    if not windowed:
        return as_mask(layout_mask(position_ids))
    sliding = as_mask(layout_mask(position_ids, window))
    if not any("sliding" in t for t in layer_types) or all("sliding" in t for t in layer_types):
        return sliding  # one window for every layer (Mistral)
    full = as_mask(layout_mask(position_ids))
    masks = {t: sliding if "sliding" in t else full for t in layer_types}
    for t in getattr(config, "layer_types", None) or []:
        masks.setdefault(str(t), None)  # recurrent and conv layers: no padding in a packed row
    return masks


def _flex_attention():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return flex_attention


_compiled_flex = []
_flex_failed: list = []


def _flex(query, key, value, runs, scaling):
    from torch.nn.attention.flex_attention import create_block_mask

    if not _compiled_flex:
        # Compiled once for every model (transformers recompiles whenever a module's training flag changes).
        flex = _flex_attention()
        _compiled_flex.append(torch.compile(flex) if query.is_cuda else flex)
    t = query.shape[2]
    run_start, prefix_start, prefix_end = _layout_vectors(runs, query.device)

    def within_run_or_prefix(b, h, q_idx, kv_idx):
        return _may_attend(q_idx, kv_idx, run_start[q_idx], prefix_start[q_idx], prefix_end[q_idx])

    # Compiled on CUDA so that the [T, T] predicate is never materialised, only its [T/128, T/128] block map.
    block_mask = create_block_mask(within_run_or_prefix, None, None, t, t, device=query.device, _compile=query.is_cuda)
    groups = query.shape[1] // key.shape[1]
    return _compiled_flex[0](query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=groups > 1)


def _per_run(query, key, value, runs, dropout, scaling):
    """One attention call per run: causal on its own tokens, after the prefix's keys when it has one."""
    outputs = []
    for start, end, prefix_start, prefix_end in runs:
        k, v = key[:, :, start:end], value[:, :, start:end]
        if prefix_end > prefix_start:
            k = torch.cat([key[:, :, prefix_start:prefix_end], k], dim=2)
            v = torch.cat([value[:, :, prefix_start:prefix_end], v], dim=2)
        outputs.append(run_attention(query[:, :, start:end], k, v, dropout, scaling))
    return torch.cat(outputs, dim=2)  # [1, Hq, T, D]


# Largest query x key count of one run that `run_attention` computes with explicit matmuls on the CPU
# when it will be differentiated. SDPA's CPU flash kernel is slow at a GSM8K group's sizes in its backward
# pass: forward + backward 1.3-1.9x faster as matmuls up to about 220 x 220, slower beyond, where flash
# also skips the causal half (2 cores, bf16; `python benchmarks/bench_attention.py --runs`, in
# benchmarks/RESULTS.md). Forward alone gains at most 1.16x there, so scoring stays on SDPA.
CPU_MATMUL_ATTENTION_MAX = 220 * 220


def run_attention(q, k, v, dropout: float = 0.0, scaling: float | None = None, matmul: bool | None = None):
    """Attention of q [B, H, Tq, D] over k, v [B, H, Tk, D], Tk >= Tq, causal aligned to the bottom right:
    every query sees the first Tk - Tq keys (a shared prompt, or none) and its own run up to itself.

    `matmul` None chooses explicit matmuls on the CPU when autograd records, the attention computes in
    bf16 or fp16 (the inputs' dtype, or autocast's, which SDPA would cast them to) and the run is at most
    CPU_MATMUL_ATTENTION_MAX. They round q, k and v to that dtype as SDPA does and keep the scores and
    the softmax in fp32 as its flash kernel does: only the probabilities are rounded before they weigh v.
    """
    tq, tk = q.shape[2], k.shape[2]
    dtype = _attention_dtype(q)
    if matmul is None:
        low_precision = dtype in (torch.bfloat16, torch.float16) and not dropout
        differentiated = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        matmul = q.device.type == "cpu" and low_precision and differentiated and tq * tk <= CPU_MATMUL_ATTENTION_MAX
    if not matmul:
        if tq == tk:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    if dropout:
        raise ValueError("run_attention with matmul=True takes no dropout")
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores_dtype = torch.promote_types(dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the scores' matmul in bf16
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        scores = torch.matmul(q.to(scores_dtype), k.to(scores_dtype).transpose(-1, -2)) * scale
        hidden = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(tk - tq + 1)
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        return torch.matmul(probs.to(dtype), v)


def _attention_dtype(q: torch.Tensor) -> torch.dtype:
    """What SDPA would compute q in: autocast's dtype for fp32 inputs while autocast is on."""
    device = q.device.type
    if q.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return q.dtype


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] of one packed row -> [1, T, Hq, D], like transformers' sdpa."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = current_row(query.shape[2])
    path = packed_path(query.device)
    plain = attention_mask is None and query.shape[2] == key.shape[2] and query.shape[0] == 1
    if not plain or position_ids is None or path == "sdpa":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    runs = row_layout(position_ids)
    # flash-attn's varlen kernel takes whole sequences only: rows with shared prompts go per run.
    if path == "flash" and not has_shared_prefix(runs):
        from transformers.integrations.flash_attention import flash_attention_forward

        kwargs["position_ids"] = position_ids  # where the model did not hand them down, the row's
        return flash_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if path == "flex" and not _flex_failed:
        if dropout:
            raise ValueError("flex_attention takes no attention dropout; set OPD_PACKED_ATTENTION=per_sequence")
        try:
            return _flex(query, key, value, runs, scaling).transpose(1, 2).contiguous(), None
        except Exception as exc:  # a torch/triton pair whose flex compile fails: same math, one call per sequence
            _flex_failed.append(exc)
            warnings.warn(f"flex_attention failed ({type(exc).__name__}: {exc}); packed rows now run one SDPA call "
                          "per sequence", stacklevel=2)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return _per_run(query, key, value, runs, dropout, scaling).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
AttentionMaskInterface.register(PACKED_SDPA, _packed_mask)


def model_attention(name: str) -> str:
    """The transformers implementation to load for the configured one: `sdpa` becomes `PACKED_SDPA`."""
    return PACKED_SDPA if name == "sdpa" else name

"""The last layer's hidden states of a packed row, at the positions the loss reads, with the lm_head weight beside them."""

from __future__ import annotations

import torch

from opd_local.attention import packed_row, packed_row_mask
from opd_local.output_heads import lm_head_weight

def final_hidden_states(
    model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None
) -> torch.Tensor:
    """Last-layer hidden states of one packed row: `[1, T, H]`.

    `use_cache=False`, and the row's layout in force (`attention.packed_row`) for the layers that read it
    rather than take it as an argument. `attention_mask` is what `attention.packed_row_mask` gives.
    """
    with packed_row(position_ids):
        out = model.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def active_hidden_states(model, batch) -> torch.Tensor:
    """Hidden states at the packed batch's active positions, `[N_active, H]`."""
    mask = packed_row_mask(model.config, batch.position_ids, next(model.parameters()).dtype, batch.shared_prefix)
    hidden = final_hidden_states(model, batch.input_ids, batch.position_ids, mask)[0]  # [T, H]
    return hidden.index_select(0, batch.logit_positions)


def active_hidden_and_head(model, batch, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`active_hidden_states` and the lm_head weight, both in `dtype` (default: the hidden states' own).

    Under bf16 autocast the final norm leaves the hidden states fp32; casting both to bf16 here is
    what lets the fused loss's matmuls run on bf16 units (it accumulates in fp32 either way).
    """
    active_hidden = active_hidden_states(model, batch)
    dtype = dtype or active_hidden.dtype
    return active_hidden.to(dtype), lm_head_weight(model).to(dtype)

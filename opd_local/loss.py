"""The student side of the OPD loss (DESIGN.md steps 5-6) on one packed micro-batch.

The student's final hidden states at the active positions go straight into the fused
`kernels.linear_opd_loss`, which returns the loss and the per-token student logprob and
has its gradient ready from the forward pass.
"""

from __future__ import annotations

import torch

import kernels
from opd_local.config import LossConfig
from opd_local.models import active_hidden_and_head
from opd_local.packing import PackedBatch


def opd_micro_batch_loss(
    student,
    batch: PackedBatch,
    teacher_lp: torch.Tensor,  # [N_active] fp32
    rollout_lp: torch.Tensor,  # [N_active] fp32
    loss_cfg: LossConfig,
    normalizer: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss share of this micro-batch, student_lp [N_active]); `normalizer` is the step's N_active."""
    if loss_cfg.objective != "sampled_rkl":
        raise ValueError(f"loss.objective={loss_cfg.objective!r} is not available; use sampled_rkl")
    active_hidden, weight = active_hidden_and_head(student, batch)
    return kernels.linear_opd_loss(
        active_hidden,
        weight,
        batch.targets,
        teacher_lp,
        rollout_lp,
        kl_coef=loss_cfg.kl_coef,
        log_ratio_cap=loss_cfg.log_ratio_cap,
        normalizer=normalizer,
        temperature=temperature,
        importance_ratio=loss_cfg.importance_ratio,
        chunk_tokens=loss_cfg.chunk_tokens,
    )

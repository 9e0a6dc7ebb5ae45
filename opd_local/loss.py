"""The student side of the OPD loss (docs/design.md, "The step", 5-6) on one packed micro-batch.

The student's final hidden states at the active positions go straight into a fused `kernels`
entry, which returns the loss and the per-token student logprob and has its gradient ready
from the forward pass:
- `sampled_rkl` (the default): the sampled-token loss of docs/design.md, "The loss and its gradient", from the teacher's
  logprob of each sampled token (`kernels.linear_opd_loss`);
- `full_rkl`, `topk_rkl`, `fkl`, `jsd`: a divergence over the whole vocabulary at each active
  position, from the teacher's final hidden states there (`kernels.linear_divergence_loss`).
"""

from __future__ import annotations

import torch

import kernels
from opd_local.config import LossConfig
from opd_local.models import active_hidden_and_head, logit_transform
from opd_local.packing import PackedBatch

OBJECTIVES = ("sampled_rkl",) + kernels.torch_ops.DIVERGENCES
NORMALIZATIONS = ("token", "sequence")


def needs_teacher_hidden(loss_cfg: LossConfig) -> bool:
    """Full-vocabulary objectives need the teacher's hidden states, not only its sampled-token logprobs."""
    return loss_cfg.objective != "sampled_rkl"


def check_loss_config(loss_cfg: LossConfig) -> None:
    if loss_cfg.objective not in OBJECTIVES:
        raise ValueError(f"loss.objective={loss_cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if loss_cfg.normalize not in NORMALIZATIONS:
        raise ValueError(f"loss.normalize={loss_cfg.normalize!r}; choose token or sequence")
    if loss_cfg.objective == "topk_rkl" and loss_cfg.topk < 1:
        raise ValueError(f"loss.topk must be >= 1, got {loss_cfg.topk}")
    if loss_cfg.objective == "jsd" and not 0.0 < loss_cfg.jsd_beta < 1.0:
        raise ValueError(f"loss.jsd_beta must be in (0, 1), got {loss_cfg.jsd_beta}")


def token_divisors(
    completion_lengths: list[int], loss_cfg: LossConfig, active_tokens: float, sequences: float
) -> float | torch.Tensor:
    """What each token's loss is divided by, from the step's global counts (all micro-batches, all ranks).

    token: the step's active-token count, so every token weighs the same.
    sequence: the sequence's own length times the step's sequence count, so every completion weighs
    the same whatever its length (the loss is a mean over sequences of per-sequence token means).
    """
    if loss_cfg.normalize == "token":
        return active_tokens
    return torch.cat([torch.full((n,), float(n) * sequences) for n in completion_lengths])


def teacher_rows_for(student_head: torch.Tensor, teacher_head: torch.Tensor) -> torch.Tensor:
    """The teacher's lm_head rows the student's head has too (docs/design.md, "Interfaces", Models).

    A teacher whose head is padded wider than the student's (Qwen2.5-7B's 152064 rows against
    1.5B's 151936, one tokenizer) has rows past the student's that are no token of the shared
    tokenizer: its distribution is taken over the student's rows, renormalized. A narrower teacher
    head is refused before step 0 for these objectives (`models.check_output_heads`).
    """
    return teacher_head[: student_head.shape[0]] if teacher_head.shape[0] > student_head.shape[0] else teacher_head


def opd_micro_batch_loss(
    student,
    batch: PackedBatch,
    teacher_lp: torch.Tensor,  # [N_active] fp32
    rollout_lp: torch.Tensor,  # [N_active] fp32
    loss_cfg: LossConfig,
    normalizer: float | torch.Tensor,  # from `token_divisors`
    temperature: float,
    teacher_hidden: torch.Tensor | None = None,  # [N_active, H_t], full-vocabulary objectives only
    teacher_head: torch.Tensor | None = None,  # [V, H_t]
    compute_dtype: torch.dtype | None = None,  # the precision policy's loss-input dtype; None: the model's own
    teacher_logit_transform: tuple[float, float | None] = (1.0, None),  # `models.logit_transform` of the teacher
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss share of this micro-batch, student_lp [N_active]); runs under the caller's autocast."""
    active_hidden, weight = active_hidden_and_head(student, batch, compute_dtype)
    scale, softcap = logit_transform(student)
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(active_hidden.device)
    if loss_cfg.objective == "sampled_rkl":
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
            logit_scale=scale,
            softcap=softcap,
        )
    if teacher_hidden is None or teacher_head is None:
        raise ValueError(f"loss.objective={loss_cfg.objective} needs the teacher's hidden states and lm_head")
    # The exact divergence at each visited position has no per-token importance weight: the
    # positions come from the rollout policy, which the trainer's weights equal at the step's start.
    loss, student_lp, _ = kernels.linear_divergence_loss(
        active_hidden,
        weight,
        teacher_hidden.to(active_hidden.dtype),
        teacher_rows_for(weight, teacher_head).to(active_hidden.dtype),
        batch.targets,
        objective=loss_cfg.objective,
        normalizer=normalizer,
        scale=loss_cfg.kl_coef,
        k=loss_cfg.topk,
        beta=loss_cfg.jsd_beta,
        temperature=temperature,
        chunk_tokens=loss_cfg.chunk_tokens,
        logit_scale=scale,
        softcap=softcap,
        teacher_logit_scale=teacher_logit_transform[0],
        teacher_softcap=teacher_logit_transform[1],
    )
    return loss, student_lp

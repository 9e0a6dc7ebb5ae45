"""build_optimizer: torch's fused AdamW where it applies, stepping like the `foreach` implementation; and
optimizer_step, the one place a step clips, updates or skips, advances the schedule and clears the gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from opd_local.config import Config
from opd_local.optimizer import build_optimizer, optimizer_step
from opd_local.training import AccumulatedLoss


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))


def test_fused_adamw_steps_like_foreach():
    cfg = Config()
    cfg.optim.lr, cfg.optim.weight_decay = 1e-2, 0.1  # large enough that five steps move every weight visibly
    fused_model, foreach_model = _model(), _model()
    fused, _ = build_optimizer(fused_model, cfg.optim)
    assert fused.param_groups[0]["fused"] is True
    reference = torch.optim.AdamW(
        foreach_model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, foreach=True,
    )
    start = copy.deepcopy(fused_model.state_dict())
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(4, 16, generator=generator)
        for model, optimizer in ((fused_model, fused), (foreach_model, reference)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for name, value in fused_model.state_dict().items():
        other = foreach_model.state_dict()[name]
        assert (value - start[name]).abs().max() > 1e-3  # the comparison is not between unmoved weights
        torch.testing.assert_close(value, other, rtol=1e-5, atol=1e-6)


def test_parameters_the_fused_kernel_cannot_take_keep_the_default():
    model = torch.nn.Linear(4, 4).double()  # no fused AdamW kernel for float64
    optimizer, _ = build_optimizer(model, Config().optim)
    assert not optimizer.param_groups[0]["fused"]


def test_resume_keeps_this_runs_adamw_implementation(tmp_path):
    """A checkpoint saved by a `foreach` AdamW resumes into the fused one build_optimizer chose, with
    its moments and step count, and steps like the saved implementation would have."""
    from opd_local import distributed
    from opd_local.checkpoint import load_training_state, save_training_state

    cfg = Config()
    cfg.optim.lr = 1e-2
    ctx = distributed.init_distributed("cpu")
    saved_model = _model()
    saved = torch.optim.AdamW(saved_model.parameters(), lr=cfg.optim.lr, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(saved, lambda s: 1.0)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    saved_model(x).square().mean().backward()
    saved.step()
    checkpoint = save_training_state(tmp_path, 1, saved_model, saved, scheduler, {"step": 1}, ctx, keep=0)

    resumed_model = _model()
    resumed, resumed_scheduler = build_optimizer(resumed_model, cfg.optim)
    load_training_state(checkpoint, resumed_model, resumed, resumed_scheduler, ctx)
    assert resumed.param_groups[0]["fused"] is True and not resumed.param_groups[0]["foreach"]
    assert int(resumed.state[resumed.param_groups[0]["params"][0]]["step"]) == 1

    for model, optimizer in ((resumed_model, resumed), (saved_model, saved)):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    for name, value in resumed_model.state_dict().items():
        torch.testing.assert_close(value, saved_model.state_dict()[name], rtol=1e-5, atol=1e-6)


def _with_gradients(model: torch.nn.Module, fill: float | None = None) -> AccumulatedLoss:
    model(torch.ones(2, 16)).square().sum().backward()
    if fill is not None:
        next(model.parameters()).grad.fill_(fill)
    return AccumulatedLoss(torch.tensor([0.5, 0.25], dtype=torch.float64), active_tokens=10.0)


def test_a_step_clips_updates_schedules_and_clears_the_gradients():
    model, cfg = _model(), Config()
    cfg.optim.grad_clip, cfg.optim.warmup_steps = 0.5, 3
    optimizer, scheduler = build_optimizer(model, cfg.optim)
    before = copy.deepcopy(model.state_dict())
    accumulated = _with_gradients(model)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float64) for p in model.parameters()]))
    lr = scheduler.get_last_lr()[0]
    metrics = optimizer_step(model, optimizer, scheduler, cfg.optim, accumulated)
    assert metrics["optim/grad_norm"] == pytest.approx(float(norm), rel=1e-6)  # reported before clipping
    assert metrics["opd/loss"] == 0.5 and metrics["rollout/trainer_lp_mismatch"] == 0.025 and metrics["optim/skipped"] == 0.0
    assert all(not torch.equal(p, before[n]) for n, p in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert scheduler.get_last_lr()[0] == 2 * lr  # warm-up: (s + 1) / 4 of the rate


def test_a_step_with_a_non_finite_gradient_is_skipped_but_still_schedules_and_clears():
    model, cfg = _model(), Config()
    cfg.optim.warmup_steps = 3
    optimizer, scheduler = build_optimizer(model, cfg.optim)
    before = copy.deepcopy(model.state_dict())
    metrics = optimizer_step(model, optimizer, scheduler, cfg.optim, _with_gradients(model, fill=float("nan")))
    assert metrics["optim/skipped"] == metrics["optim/diverged"] == 1.0
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert scheduler.last_epoch == 1
    nothing = AccumulatedLoss(torch.zeros(2, dtype=torch.float64), active_tokens=0.0)  # every rollout dropped
    assert optimizer_step(model, optimizer, scheduler, cfg.optim, nothing) == {"optim/skipped": 1.0}
    assert scheduler.last_epoch == 2 and all(torch.equal(p, before[n]) for n, p in model.state_dict().items())

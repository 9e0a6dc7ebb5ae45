"""The implementations the loss-kernel benchmark compares, each declared once with the devices it runs on.

A candidate's builder takes the op's inputs and returns a zero-argument forward + backward step (or raises
ImportError: "not installed"). "ours" is the public `kernels.*` entry with the default backend: the Triton
op on CUDA, the chunked torch path on CPU. On CPU the table is the CUDA table filtered: rows of our own
GPU-only paths (the separate chunked-torch row, which on CPU is "ours" itself, and fixed Triton tiles) are left
out, and third-party GPU-only kernels read "needs CUDA".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

OPS = ("logprob", "opd", "linear_logprob", "linear_opd", "kl")
TOPK = 64
CUDA, BOTH = ("cuda",), ("cuda", "cpu")


@dataclass(frozen=True)
class Candidate:
    name: str | dict | Callable[[], str]  # a row label; one per device ({"cuda": ..., "cpu": ...}); or made on use
    build: Callable[[dict], Callable[[], None]]
    devices: tuple = BOTH
    # "ours", "eager", "compile" (the rows others are compared with), "ours-path" (another path of our op:
    # left out where it does not run) or "other".
    kind: str = "other"

    def label(self, device: str) -> str:
        if callable(self.name):
            return self.name()
        return self.name[device] if isinstance(self.name, dict) else self.name


def eager_logprob(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def eager_opd(logits, targets, teacher_lp, rollout_lp, normalizer, cap=2.0):
    student_lp = eager_logprob(logits, targets)
    ratio = torch.exp(torch.clamp(student_lp - rollout_lp, max=cap))
    return -(ratio * (teacher_lp - rollout_lp)).sum() / normalizer


def eager_linear_logprob(hidden, weight, targets):
    return eager_logprob(hidden @ weight.T, targets)


def eager_linear_opd(hidden, weight, targets, teacher_lp, rollout_lp, normalizer):
    return eager_opd(hidden @ weight.T, targets, teacher_lp, rollout_lp, normalizer)


def eager_kl(student_logits, teacher_logits):
    logp_s = torch.log_softmax(student_logits.float(), dim=-1)
    logp_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1)


def grad_step(forward, inputs):
    def step():
        out = forward()
        if isinstance(out, tuple):
            out = out[0]
        torch.autograd.grad(out.sum(), inputs)

    return step


@functools.cache
def compile_once(fn):
    """torch.compile each eager baseline once per run, whichever table uses it."""
    return torch.compile(fn, dynamic=False)


def baselines(eager, args_of, inputs_of):
    """The torch eager and torch.compile rows of one eager function."""
    return [
        Candidate("torch eager", lambda x: grad_step(lambda: eager(*args_of(x)), inputs_of(x)), kind="eager"),
        Candidate("torch.compile", lambda x: grad_step(lambda: compile_once(eager)(*args_of(x)), inputs_of(x)),
                  kind="compile"),
    ]


def _opd_kw(x):
    return dict(normalizer=float(x["n"]))


def _liger_ce(x):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    # Liger writes the gradient into its input during forward: give it its own copy.
    own = x["logits"].detach().clone().requires_grad_(True)
    loss = LigerCrossEntropyLoss(reduction="sum")
    return grad_step(lambda: loss(own, x["targets"]), [own])


def _torch_lce(x):
    fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
    if fn is None:
        raise ImportError("torch.nn.functional.linear_cross_entropy")
    return grad_step(lambda: fn(x["hidden"], x["weight"], x["targets"], reduction="sum"), [x["hidden"], x["weight"]])


def _liger_flce(x):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return grad_step(lambda: loss(x["weight"], x["hidden"], x["targets"]), [x["hidden"], x["weight"]])


def _cce(x):
    from cut_cross_entropy import linear_cross_entropy

    return grad_step(lambda: linear_cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="sum"),
                     [x["hidden"], x["weight"]])


def _liger_jsd(x):
    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=1.0)  # beta = 1: KL(student || teacher), on log-probs torch computes first
    s, t = x["logits"], x["teacher_logits"]
    return grad_step(lambda: jsd(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)), [s])


def _liger_fused_jsd(x):
    from liger_kernel.transformers import LigerFusedLinearJSD

    jsd = LigerFusedLinearJSD(jsd_beta=1.0)
    hw = [x["hidden"], x["weight"]]
    return grad_step(lambda: jsd(x["hidden"], x["weight"], x["teacher_hidden"], x["weight"].detach()), hw)


def _fixed_tiles():
    from kernels.triton.linear_tiles import GPU_TILES  # imports triton: only where the row runs

    return GPU_TILES


def _logits_args(x):
    return x["logits"], x["targets"]


def _opd_args(x):
    return x["logits"], x["targets"], x["teacher_lp"], x["rollout_lp"]


def _linear_args(x):
    return x["hidden"], x["weight"], x["targets"]


def _linear_opd_args(x):
    return x["hidden"], x["weight"], x["targets"], x["teacher_lp"], x["rollout_lp"]


def _logits(x):
    return [x["logits"]]


def _hw(x):
    return [x["hidden"], x["weight"]]


def _entry(name, args_of, inputs_of, with_kw=False, **options):
    """A step through the public `kernels.<name>` entry, with `options` (a backend, tiles)."""

    def build(x):
        import kernels

        fn = getattr(kernels, name)
        kw = dict(_opd_kw(x) if with_kw else {}, **{k: v() if callable(v) else v for k, v in options.items()})
        return grad_step(lambda: fn(*args_of(x), **kw), inputs_of(x))

    return build


CHUNKED = "chunked torch (kernels.torch_ops)"


def candidates(op):
    """The candidates of one op, in table order."""
    if op == "logprob":
        return [
            Candidate(dict(cuda="ours (Triton)", cpu="ours: kernels.token_logprobs (chunked torch)"),
                      _entry("token_logprobs", _logits_args, _logits), kind="ours"),
            *baselines(eager_logprob, _logits_args, _logits),
            Candidate(CHUNKED, _entry("token_logprobs", _logits_args, _logits, backend="torch"), CUDA, "ours-path"),
            Candidate("Liger CrossEntropy (sum)", _liger_ce, CUDA),
        ]
    if op == "opd":
        return [
            Candidate(dict(cuda="ours (Triton, grad in forward)",
                           cpu="ours: kernels.opd_loss (chunked torch, grad in forward)"),
                      _entry("opd_loss", _opd_args, _logits, with_kw=True), kind="ours"),
            *baselines(eager_opd, lambda x: (*_opd_args(x), x["n"]), _logits),
            Candidate(CHUNKED, _entry("opd_loss", _opd_args, _logits, with_kw=True, backend="torch"), CUDA,
                      "ours-path"),
        ]
    if op in ("linear_logprob", "linear_opd"):
        # "ours" is the public entry: autotuned kernels, or the chunked cuBLAS path when N is too small to fill
        # the GPU; the "fixed tiles" row runs the kernels at GPU_TILES whatever N, to show what that saves.
        opd = op == "linear_opd"
        entry = "linear_opd_loss" if opd else "linear_token_logprobs"
        args_of = _linear_opd_args if opd else _linear_args
        grad_note = ", grad in forward" if opd else ""
        return [
            Candidate(dict(cuda=f"ours (Triton{grad_note}; chunked cuBLAS below a wave of row blocks)",
                           cpu=f"ours: kernels.{entry} (chunked torch{grad_note})"),
                      _entry(entry, args_of, _hw, with_kw=opd), kind="ours"),
            Candidate(lambda: f"Triton kernels, fixed tiles {_fixed_tiles()}",
                      _entry(entry, args_of, _hw, with_kw=opd, backend="triton", tiles=_fixed_tiles), CUDA,
                      "ours-path"),
            *baselines(eager_linear_opd if opd else eager_linear_logprob,
                       (lambda x: (*args_of(x), x["n"])) if opd else args_of, _hw),
            Candidate(CHUNKED, _entry(entry, args_of, _hw, with_kw=opd, backend="torch"), CUDA, "ours-path"),
            Candidate("torch F.linear_cross_entropy (sum)", _torch_lce),
            Candidate("Liger FusedLinearCrossEntropy (sum)", _liger_flce, CUDA),
            Candidate("Cut Cross-Entropy linear_cross_entropy (sum)", _cce, CUDA),
        ]
    if op == "kl":
        kl_args = lambda x: (x["logits"], x["teacher_logits"])  # noqa: E731
        return [
            Candidate(dict(cuda="ours full (Triton)", cpu="ours: kernels.full_reverse_kl (chunked torch)"),
                      _entry("full_reverse_kl", kl_args, _logits), kind="ours"),
            Candidate(dict(cuda=f"ours top-{TOPK} + tail (Triton)",
                           cpu=f"ours: kernels.topk_reverse_kl k={TOPK} + tail (chunked torch)"),
                      _entry("topk_reverse_kl", lambda x: (*kl_args(x), TOPK), _logits), kind="ours"),
            *baselines(eager_kl, kl_args, _logits),
            Candidate(CHUNKED, _entry("full_reverse_kl", kl_args, _logits, backend="torch"), CUDA, "ours-path"),
            Candidate("Liger JSD beta=1 (after torch log_softmax)", _liger_jsd, CUDA),
            Candidate("Liger FusedLinearJSD beta=1 (from hidden: + 2 matmuls)", _liger_fused_jsd, CUDA),
        ]
    raise ValueError(op)

"""Loss-kernel speed and memory: our Triton ops against torch eager, torch.compile, Liger-Kernel and Cut Cross-Entropy.

    python benchmarks/bench_kernel.py                 # every op on the full shape grid (tens of minutes on an H100)
    python benchmarks/bench_kernel.py --quick         # smallest shape only
    python benchmarks/bench_kernel.py --ops linear_opd --n 16384 --v 151936 --h 4096

Every cell times forward + backward (torch.autograd.grad, so no .grad accumulation) with
triton.testing.do_bench (explicit warmup/rep in ms; rep grows to >= 10 runs of a slow candidate, since
do_bench times a candidate slower than `rep` only once) and reports the median with p20/p80, the peak
extra memory over the inputs, and GB/s and TFLOP/s against this run's measured device ceilings (a large
device-to-device copy and a large bf16 matmul). GB/s and TFLOP/s count the op's minimum work, the same for
every candidate, so they compare implementations rather than reward extra traffic:
  logits ops: bytes = logits read twice + dlogits written once (KL: both logits twice, dlogits once);
  fused-linear ops: FLOPs = 6NVH (logits 2NVH, dH 2NVH, dW 2NVH), bytes = H, W read + dH, dW written.
Inputs look real: hidden = LayerNorm(randn), weight scaled so logits have std --logit-std, targets sampled
from the model's own softmax (on-policy tokens; CCE's gradient filtering depends on that sparsity).
Prints one markdown table per op with device, date and the exact command; paste it into RESULTS.md.

CPU mode (automatic without a CUDA device, or --device cpu) runs the same comparison with the candidates that
exist on a CPU: ours = the `kernels.*` entries with the default backend (the chunked torch reference on CPU),
torch eager and torch.compile ("not run" if compiling fails or exceeds --compile-timeout); the Triton/CUDA-only
rows (Liger, Cut Cross-Entropy) read "needs CUDA". Smaller defaults (ops logprob, opd, linear_opd; N 1024, 2048;
V 49152; H 576: about 4 minutes on 2 cores; all five ops at these N take about 9),
time.perf_counter median and p20/p80 over --cpu-repeats runs after --cpu-warmup untimed ones, peak extra memory
from the torch profiler's allocator events, and ceilings from a large CPU tensor copy and a 3072^3 matmul:
    python benchmarks/bench_kernel.py --device cpu            # logprob, opd, linear_opd at N 1024 and 2048
    python benchmarks/bench_kernel.py --device cpu --quick    # the same ops at N=1024, 1 untimed + 3 timed runs
    python benchmarks/bench_kernel.py --device cpu --ops logprob opd linear_logprob linear_opd kl   # all ops
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import os
import platform
import shlex
import signal
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OPS = ("logprob", "opd", "linear_logprob", "linear_opd", "kl")
FULL_N, FULL_V, FULL_H = (4096, 16384, 65536), (49152, 151936), (576, 4096)
TOPK = 64


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_linear_inputs(n, v, h, logit_std, dtype, seed=0, device="cuda"):
    """hidden [N, H] (LayerNorm of Gaussian), weight [V, H], on-policy targets [N], and their fp32 lp [N]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, generator=gen)
    hidden = torch.nn.functional.layer_norm(hidden, (h,)).to(dtype)
    weight = (torch.randn(v, h, device=device, generator=gen) * (logit_std / h**0.5)).to(dtype)
    targets = torch.empty(n, dtype=torch.long, device=device)
    lp = torch.empty(n, device=device)
    entropy = torch.empty(n, device=device)
    for s in range(0, n, 2048):  # sample from the model's own softmax, a chunk of rows at a time
        logits = (hidden[s : s + 2048] @ weight.T).float()
        logp = torch.log_softmax(logits, dim=-1)
        targets[s : s + 2048] = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
        lp[s : s + 2048] = logp.gather(1, targets[s : s + 2048, None]).squeeze(1)
        entropy[s : s + 2048] = -(logp.exp() * logp).sum(-1)
    stats = f"entropy {entropy.mean().item():.2f} nats, p(target) {lp.exp().mean().item():.3f}"
    return hidden, weight, targets, lp, stats


def make_logits(hidden, weight):
    logits = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    for s in range(0, hidden.shape[0], 4096):
        torch.matmul(hidden[s : s + 4096], weight.T, out=logits[s : s + 4096])
    return logits


def opd_lps(lp, seed=1):
    gen = torch.Generator(device=lp.device).manual_seed(seed)
    rollout_lp = lp + 0.05 * torch.randn(lp.shape, device=lp.device, generator=gen)
    teacher_lp = rollout_lp + torch.randn(lp.shape, device=lp.device, generator=gen)
    return teacher_lp, rollout_lp


# ---------------------------------------------------------------------------------------------
# Candidates: name -> builder returning a zero-argument forward+backward step
# ---------------------------------------------------------------------------------------------


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

def candidates(op, x):
    """[(name, builder)] for one op; a builder returns a step or raises ImportError ("not installed")."""
    import kernels
    from kernels import divergence, linear_logprob, logprob, reference

    opd_kw = lambda: dict(normalizer=float(x["n"]))  # noqa: E731
    if op == "logprob":
        a = (x["logits"], x["targets"])
        rows = [
            ("ours (Triton)", lambda: grad_step(lambda: logprob.token_logprobs(*a), [a[0]])),
            ("torch eager", lambda: grad_step(lambda: eager_logprob(*a), [a[0]])),
            ("torch.compile", lambda: grad_step(lambda: compile_once(eager_logprob)(*a), [a[0]])),
            ("chunked torch (kernels.reference)", lambda: grad_step(lambda: reference.token_logprobs(*a), [a[0]])),
        ]

        def liger_ce():
            from liger_kernel.transformers import LigerCrossEntropyLoss

            # Liger writes the gradient into its input during forward: give it its own copy.
            own = x["logits"].detach().clone().requires_grad_(True)
            loss = LigerCrossEntropyLoss(reduction="sum")
            return grad_step(lambda: loss(own, a[1]), [own])

        rows.append(("Liger CrossEntropy (sum)", liger_ce))
        return rows
    if op == "opd":
        a = (x["logits"], x["targets"], x["teacher_lp"], x["rollout_lp"])
        return [
            ("ours (Triton, grad in forward)", lambda: grad_step(lambda: logprob.opd_loss(*a, **opd_kw()), [a[0]])),
            ("torch eager", lambda: grad_step(lambda: eager_opd(*a, x["n"]), [a[0]])),
            ("torch.compile", lambda: grad_step(lambda: compile_once(eager_opd)(*a, x["n"]), [a[0]])),
            ("chunked torch (kernels.reference)",
             lambda: grad_step(lambda: reference.opd_loss(*a, **opd_kw()), [a[0]])),
        ]
    if op in ("linear_logprob", "linear_opd"):
        hw = [x["hidden"], x["weight"]]
        # "ours" is the public entry: autotuned kernels, or the chunked cuBLAS path when N is too small to fill
        # the GPU; the "fixed tiles" row runs the kernels at GPU_TILES whatever N, to show what that saves.
        tiles = linear_logprob.GPU_TILES
        if op == "linear_logprob":
            a = (x["hidden"], x["weight"], x["targets"])
            rows = [
                ("ours (Triton; chunked cuBLAS below a wave of row blocks)",
                 lambda: grad_step(lambda: linear_logprob.linear_token_logprobs(*a), hw)),
                (f"Triton kernels, fixed tiles {tiles}",
                 lambda: grad_step(lambda: linear_logprob.linear_token_logprobs(*a, tiles=tiles), hw)),
                ("torch eager", lambda: grad_step(lambda: eager_linear_logprob(*a), hw)),
                ("torch.compile", lambda: grad_step(lambda: compile_once(eager_linear_logprob)(*a), hw)),
                ("chunked torch (kernels.reference)",
                 lambda: grad_step(lambda: reference.linear_token_logprobs(*a), hw)),
            ]
        else:
            a = (x["hidden"], x["weight"], x["targets"], x["teacher_lp"], x["rollout_lp"])
            rows = [
                ("ours (Triton, grad in forward; chunked cuBLAS below a wave of row blocks)",
                 lambda: grad_step(lambda: linear_logprob.linear_opd_loss(*a, **opd_kw()), hw)),
                (f"Triton kernels, fixed tiles {tiles}",
                 lambda: grad_step(lambda: linear_logprob.linear_opd_loss(*a, **opd_kw(), tiles=tiles), hw)),
                ("torch eager", lambda: grad_step(lambda: eager_linear_opd(*a, x["n"]), hw)),
                ("torch.compile", lambda: grad_step(lambda: compile_once(eager_linear_opd)(*a, x["n"]), hw)),
                ("chunked torch (kernels.reference)",
                 lambda: grad_step(lambda: reference.linear_opd_loss(*a, **opd_kw()), hw)),
            ]

        def torch_lce():
            fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
            if fn is None:
                raise ImportError("torch.nn.functional.linear_cross_entropy")
            return grad_step(lambda: fn(x["hidden"], x["weight"], x["targets"], reduction="sum"), hw)

        def liger_flce():
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
            return grad_step(lambda: loss(x["weight"], x["hidden"], x["targets"]), hw)

        def cce():
            from cut_cross_entropy import linear_cross_entropy

            return grad_step(lambda: linear_cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="sum"), hw)

        rows += [
            ("torch F.linear_cross_entropy (sum)", torch_lce),
            ("Liger FusedLinearCrossEntropy (sum)", liger_flce),
            ("Cut Cross-Entropy linear_cross_entropy (sum)", cce),
        ]
        return rows
    if op == "kl":
        a = (x["logits"], x["teacher_logits"])
        s = [a[0]]

        def liger_jsd():
            from liger_kernel.transformers import LigerJSD

            jsd = LigerJSD(beta=1.0)  # beta = 1: KL(student || teacher), on log-probs torch computes first

            def fwd():
                return jsd(torch.log_softmax(a[0].float(), -1), torch.log_softmax(a[1].float(), -1))

            return grad_step(fwd, s)

        def liger_fused_jsd():
            from liger_kernel.transformers import LigerFusedLinearJSD

            jsd = LigerFusedLinearJSD(jsd_beta=1.0)
            hw = [x["hidden"], x["weight"]]
            return grad_step(lambda: jsd(x["hidden"], x["weight"], x["teacher_hidden"], x["weight"].detach()), hw)

        return [
            ("ours full (Triton)", lambda: grad_step(lambda: divergence.full_reverse_kl(*a), s)),
            (f"ours top-{TOPK} + tail (Triton)", lambda: grad_step(lambda: divergence.topk_reverse_kl(*a, TOPK), s)),
            ("torch eager", lambda: grad_step(lambda: eager_kl(*a), s)),
            ("torch.compile", lambda: grad_step(lambda: compile_once(eager_kl)(*a), s)),
            ("chunked torch (kernels.reference)", lambda: grad_step(lambda: kernels.reference.full_reverse_kl(*a), s)),
            ("Liger JSD beta=1 (after torch log_softmax)", liger_jsd),
            ("Liger FusedLinearJSD beta=1 (from hidden: + 2 matmuls)", liger_fused_jsd),
        ]
    raise ValueError(op)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def bench(step, warmup_ms, rep_ms):
    """(median, p20, p80) ms and peak extra MiB; rep grows so a slow step still gets >= 10 timed runs."""
    import triton.testing

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()  # warm-up: compiles, autotunes, allocates
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    once = start.elapsed_time(end)
    rep = max(rep_ms, 10 * once)
    med, p20, p80 = triton.testing.do_bench(step, warmup=max(warmup_ms, 2 * once), rep=rep, quantiles=[0.5, 0.2, 0.8])
    return (med, p20, p80), peak_mib


def device_ceilings(warmup_ms, rep_ms):
    """Measured copy GB/s (2 GiB device-to-device) and bf16 matmul TFLOP/s (8192^3) on this device."""
    import triton.testing

    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    copy_gbs = 2 * src.numel() * 2 / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    mm_tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return copy_gbs, mm_tflops


def work(op, n, v, h, elem):
    """(bytes, flops) of the op's minimum work (module docstring); flops None where memory bound."""
    if op in ("logprob", "opd"):
        return 3 * n * v * elem, None
    if op == "kl":
        return 5 * n * v * elem, None
    return 2 * (n * h + v * h) * elem, 6 * n * v * h


def build_inputs(op, n, v, h, args, dtype, base=None):
    """Inputs of one op; `base` (CPU mode) reuses the (hidden, weight, targets, lp, stats) sampled for this shape."""
    if base is None:
        base = make_linear_inputs(n, v, h, args.logit_std, dtype)
    hidden, weight, targets, lp, stats = base
    x = dict(n=n, targets=targets)
    if op in ("opd", "linear_opd"):
        x["teacher_lp"], x["rollout_lp"] = opd_lps(lp)
    if op in ("logprob", "opd", "kl"):
        x["logits"] = make_logits(hidden, weight).requires_grad_(True)
    if op == "kl":
        teacher_hidden = (hidden.float() + 0.5 * torch.randn_like(hidden, dtype=torch.float32)).to(dtype)
        x["teacher_logits"] = make_logits(teacher_hidden, weight)
        x["teacher_hidden"] = teacher_hidden
    x["hidden"] = hidden.requires_grad_(True)
    x["weight"] = weight.requires_grad_(True)
    return x, stats


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def run_op(op, shapes, args, dtype, ceilings):
    copy_gbs, mm_tflops = ceilings
    print(f"\n### {op}\n")
    print("| N | V | H | implementation | median ms | p20 ms | p80 ms | time / ours | peak extra MiB | GB/s "
          "| % copy BW | TFLOP/s | % matmul |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    elem = torch.finfo(dtype).bits // 8
    for n, v, h in shapes:
        try:
            x, stats = build_inputs(op, n, v, h, args, dtype)
        except torch.cuda.OutOfMemoryError:
            print(f"| {n} | {v} | {h} | (inputs) | OOM building inputs | | | | | | | | |")
            torch.cuda.empty_cache()
            continue
        nbytes, flops = work(op, n, v, h, elem)
        ours_ms = None
        for name, builder in candidates(op, x):
            cells = None
            try:
                step = builder()
                (med, p20, p80), peak = bench(step, args.warmup, args.rep)
                ours_ms = med if ours_ms is None and name.startswith("ours") else ours_ms
                gbs = nbytes / (med * 1e-3) / 1e9
                tflops = None if flops is None else flops / (med * 1e-3) / 1e12
                cells = [f"{med:.3f}", f"{p20:.3f}", f"{p80:.3f}",
                         f"{med / ours_ms:.2f}x" if ours_ms else "-", f"{peak:.0f}",
                         f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%", fmt(tflops, ".0f"),
                         "-" if tflops is None else f"{100 * tflops / mm_tflops:.0f}%"]
            except ImportError as exc:
                cells = [f"not installed ({exc.name or exc})"] + [""] * 8
            except torch.cuda.OutOfMemoryError:
                cells = ["OOM"] + [""] * 8
            except Exception as exc:  # one broken candidate must not sink the table
                if args.verbose:
                    traceback.print_exc()
                first = str(exc).splitlines()[0][:80].replace("|", "/") if str(exc) else ""
                cells = [f"error: {type(exc).__name__}: {first}"] + [""] * 8
            step = None
            torch.cuda.empty_cache()
            label = h if op in ("linear_logprob", "linear_opd") else f"({h})"
            print(f"| {n} | {v} | {label} | {name} | " + " | ".join(cells) + " |", flush=True)
        print(f"| {n} | {v} | | inputs: {stats} | | | | | | | | | |", flush=True)
        del x
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# CPU mode (no CUDA device, or --device cpu)
# ---------------------------------------------------------------------------------------------

# Sized so the default CPU run takes about 4 minutes on 2 cores: N = 2048 is two chunks of the reference's
# DEFAULT_CHUNK_TOKENS = 1024 (at N <= 1024 ours is one chunk and holds as much as eager). linear_logprob and kl
# are left to --ops: at N = 1024 they add about 1 and 1.5 minutes (the chunked reverse KL is ~5x eager's time).
CPU_OPS = ("logprob", "opd", "linear_opd")
CPU_N, CPU_V, CPU_H = (1024, 2048), (49152,), (576,)
CUDA_ONLY = "needs CUDA (GPU-only kernels)"


class _CompileTimeout(Exception):
    pass


def cpu_candidates(op, x):
    """[(name, kind, builder)] on CPU; kind is "ours", "eager", "compile", "other" or "cuda" (builder None).

    ours = the public `kernels.*` entry with the default backend, which on CPU tensors dispatches to the
    chunked torch reference (`kernels.reference`), so the GPU table's separate "chunked torch" row is this row.
    """
    import kernels

    opd_kw = lambda: dict(normalizer=float(x["n"]))  # noqa: E731
    if op == "logprob":
        a, s = (x["logits"], x["targets"]), [x["logits"]]
        return [
            ("ours: kernels.token_logprobs (chunked torch)", "ours",
             lambda: grad_step(lambda: kernels.token_logprobs(*a), s)),
            ("torch eager", "eager", lambda: grad_step(lambda: eager_logprob(*a), s)),
            ("torch.compile", "compile", lambda: grad_step(lambda: compile_once(eager_logprob)(*a), s)),
            ("Liger CrossEntropy (sum)", "cuda", None),
        ]
    if op == "opd":
        a, s = (x["logits"], x["targets"], x["teacher_lp"], x["rollout_lp"]), [x["logits"]]
        return [
            ("ours: kernels.opd_loss (chunked torch, grad in forward)", "ours",
             lambda: grad_step(lambda: kernels.opd_loss(*a, **opd_kw()), s)),
            ("torch eager", "eager", lambda: grad_step(lambda: eager_opd(*a, x["n"]), s)),
            ("torch.compile", "compile", lambda: grad_step(lambda: compile_once(eager_opd)(*a, x["n"]), s)),
        ]
    if op in ("linear_logprob", "linear_opd"):
        hw = [x["hidden"], x["weight"]]
        if op == "linear_logprob":
            a = (x["hidden"], x["weight"], x["targets"])
            rows = [
                ("ours: kernels.linear_token_logprobs (chunked torch)", "ours",
                 lambda: grad_step(lambda: kernels.linear_token_logprobs(*a), hw)),
                ("torch eager", "eager", lambda: grad_step(lambda: eager_linear_logprob(*a), hw)),
                ("torch.compile", "compile", lambda: grad_step(lambda: compile_once(eager_linear_logprob)(*a), hw)),
            ]
        else:
            a = (x["hidden"], x["weight"], x["targets"], x["teacher_lp"], x["rollout_lp"])
            rows = [
                ("ours: kernels.linear_opd_loss (chunked torch, grad in forward)", "ours",
                 lambda: grad_step(lambda: kernels.linear_opd_loss(*a, **opd_kw()), hw)),
                ("torch eager", "eager", lambda: grad_step(lambda: eager_linear_opd(*a, x["n"]), hw)),
                ("torch.compile", "compile",
                 lambda: grad_step(lambda: compile_once(eager_linear_opd)(*a, x["n"]), hw)),
            ]

        def torch_lce():
            fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
            if fn is None:
                raise ImportError("torch.nn.functional.linear_cross_entropy")
            return grad_step(lambda: fn(x["hidden"], x["weight"], x["targets"], reduction="sum"), hw)

        return rows + [
            ("torch F.linear_cross_entropy (sum)", "other", torch_lce),
            ("Liger FusedLinearCrossEntropy (sum)", "cuda", None),
            ("Cut Cross-Entropy linear_cross_entropy (sum)", "cuda", None),
        ]
    if op == "kl":
        a, s = (x["logits"], x["teacher_logits"]), [x["logits"]]
        return [
            ("ours: kernels.full_reverse_kl (chunked torch)", "ours",
             lambda: grad_step(lambda: kernels.full_reverse_kl(*a), s)),
            (f"ours: kernels.topk_reverse_kl k={TOPK} + tail (chunked torch)", "ours",
             lambda: grad_step(lambda: kernels.topk_reverse_kl(*a, TOPK), s)),
            ("torch eager", "eager", lambda: grad_step(lambda: eager_kl(*a), s)),
            ("torch.compile", "compile", lambda: grad_step(lambda: compile_once(eager_kl)(*a), s)),
            ("Liger JSD beta=1 (after torch log_softmax)", "cuda", None),
            ("Liger FusedLinearJSD beta=1 (from hidden: + 2 matmuls)", "cuda", None),
        ]
    raise ValueError(op)


def cpu_peak_extra_bytes(step):
    """Peak bytes held by torch's CPU allocator during one step, above what was allocated when the step began.

    The torch profiler with profile_memory=True records every allocation and free made through c10's CPU
    allocator (eager ops, autograd buffers and the buffers torch.compile'd code allocates alike) as a
    "[memory]" event with a signed byte count; their running sum in time order, maximised, is the CPU
    counterpart of torch.cuda.max_memory_allocated() - memory_allocated() in GPU mode. It does not see
    scratch memory that oneDNN/BLAS or Python objects allocate outside c10 (small next to [N, V] buffers),
    and it counts bytes allocated, not resident pages (RSS would also depend on glibc's caching).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())  # stable: same-time events keep their recorded order
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def _quantile(sorted_values, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def cpu_time(fn, repeats):
    """(median, p20, p80) ms of `fn` over `repeats` runs, time.perf_counter around each call."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return _quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8)


def _run_with_timeout(fn, seconds):
    """Call fn(); raise _CompileTimeout in this (main) thread if it runs past `seconds`."""

    def on_alarm(signum, frame):
        raise _CompileTimeout(f"compile > {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cpu_bench(step, kind, args):
    """((median, p20, p80) ms, peak extra bytes, compile s or None); raises _CompileTimeout for a slow compile.

    Untimed runs first: for torch.compile the compiling call (under --compile-timeout), then the memory-profiled
    run, then --cpu-warmup - 1 plain runs; then --cpu-repeats timed runs.
    """
    compile_s = None
    if kind == "compile":
        t0 = time.perf_counter()
        _run_with_timeout(step, args.compile_timeout)
        compile_s = time.perf_counter() - t0
        if compile_s > args.compile_timeout:  # an alarm swallowed somewhere inside the compiler
            raise _CompileTimeout(f"compile took {compile_s:.0f} s > {args.compile_timeout:g} s")
    peak = cpu_peak_extra_bytes(step)
    for _ in range(args.cpu_warmup - 1):
        step()
    return cpu_time(step, args.cpu_repeats), peak, compile_s


def cpu_ceilings(dtype):
    """Measured copy GB/s (512 MiB fp32 tensor copy, read + write) and matmul TFLOP/s (3072^3) in fp32 and `dtype`."""
    src = torch.ones(2**27, dtype=torch.float32)
    dst = torch.zeros_like(src)  # both written once, so the pages are resident before timing
    dst.copy_(src)
    ms = cpu_time(lambda: dst.copy_(src), 5)[0]
    copy_gbs = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    del src, dst
    mm = {}
    for dt in dict.fromkeys([torch.float32, dtype]):
        a, b = torch.randn(3072, 3072).to(dt), torch.randn(3072, 3072).to(dt)
        a @ b
        ms = cpu_time(lambda: a @ b, 3)[0]
        mm[dt] = 2 * 3072**3 / (ms * 1e-3) / 1e12
    return copy_gbs, mm


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _oom(exc):
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


def run_op_cpu(op, shapes, args, dtype, ceilings, base_inputs):
    copy_gbs, mm = ceilings
    mm_tflops = mm[dtype]
    print(f"\n### {op} (CPU)\n")
    print("| N | V | H | implementation | median ms | p20 ms | p80 ms | time / eager | time / compile "
          "| peak extra MiB | peak / eager | GB/s | % copy BW | TFLOP/s | % matmul |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    elem = torch.finfo(dtype).bits // 8
    empty = [""] * 10
    for n, v, h in shapes:
        label = h if op in ("linear_logprob", "linear_opd") else f"({h})"
        try:
            key = (n, v, h)
            if key not in base_inputs:  # sampled once per shape, shared by the ops (small: no [N, V] kept)
                base_inputs[key] = make_linear_inputs(n, v, h, args.logit_std, dtype, device="cpu")
            hidden, weight, targets, lp, stats = base_inputs[key]
            # detach(): fresh leaf tensors per op, so requires_grad_ here does not leak into the cached ones
            base = (hidden.detach(), weight.detach(), targets, lp, stats)
            x, stats = build_inputs(op, n, v, h, args, dtype, base=base)
        except RuntimeError as exc:
            if not _oom(exc):
                raise
            print(f"| {n} | {v} | {label} | (inputs) | OOM building inputs |" + " |" * 10)
            continue
        nbytes, flops = work(op, n, v, h, elem)
        results = []  # (name, kind, (med, p20, p80) or None, peak bytes, status)
        for name, kind, builder in cpu_candidates(op, x):
            t0 = time.perf_counter()
            if builder is None:
                results.append((name, kind, None, None, CUDA_ONLY))
                print(f"[cpu] {op} N={n} V={v} H={h}: {name}: {CUDA_ONLY}", file=sys.stderr, flush=True)
                continue
            times = peak = None
            try:
                step = builder()
                times, peak, compile_s = cpu_bench(step, kind, args)
                status = None
                if compile_s is not None:
                    name = f"{name} (compile {compile_s:.0f} s)"
            except ImportError as exc:
                status = f"not installed ({exc.name or exc})"
            except _CompileTimeout as exc:
                status = f"not run ({exc})"
            except Exception as exc:  # one broken candidate must not sink the table
                if args.verbose:
                    traceback.print_exc()
                first = str(exc).splitlines()[0][:80].replace("|", "/") if str(exc) else ""
                if _oom(exc):
                    status = "OOM"
                elif kind == "compile":
                    status = f"not run (compile failed: {type(exc).__name__}: {first})"
                else:
                    status = f"error: {type(exc).__name__}: {first}"
            step = None
            gc.collect()
            results.append((name, kind, times, peak, status))
            print(f"[cpu] {op} N={n} V={v} H={h}: {name}: {status or 'done'} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
        ref = {k: (t, p) for _, k, t, p, st in results if st is None and k in ("eager", "compile")}
        eager_ms = ref["eager"][0][0] if "eager" in ref else None
        eager_peak = ref["eager"][1] if "eager" in ref else None
        compile_ms = ref["compile"][0][0] if "compile" in ref else None
        for name, kind, times, peak, status in results:
            if status is not None:
                cells = [status] + empty
            else:
                med, p20, p80 = times
                gbs = nbytes / (med * 1e-3) / 1e9
                tflops = None if flops is None else flops / (med * 1e-3) / 1e12
                cells = [f"{med:.1f}", f"{p20:.1f}", f"{p80:.1f}",
                         f"{med / eager_ms:.2f}x" if eager_ms else "-",
                         f"{med / compile_ms:.2f}x" if compile_ms else "-",
                         f"{peak / 2**20:.0f}",
                         f"{peak / eager_peak:.2f}x" if eager_peak else "-",
                         f"{gbs:.1f}", f"{100 * gbs / copy_gbs:.0f}%", fmt(tflops, ".3f"),
                         "-" if tflops is None else f"{100 * tflops / mm_tflops:.0f}%"]
            print(f"| {n} | {v} | {label} | {name} | " + " | ".join(cells) + " |", flush=True)
        print(f"| {n} | {v} | | inputs: {stats} |" + " |" * 11, flush=True)
        del x
        gc.collect()


def main_cpu(args, dtype):
    import kernels

    started = time.perf_counter()
    if args.quick:
        args.n, args.v, args.h = [min(CPU_N)], [min(CPU_V)], [min(CPU_H)]
        args.cpu_repeats = args.cpu_repeats or 3
        args.cpu_warmup = args.cpu_warmup or 1
    args.ops = args.ops or list(CPU_OPS)
    args.n, args.v, args.h = args.n or list(CPU_N), args.v or list(CPU_V), args.h or list(CPU_H)
    args.cpu_repeats = args.cpu_repeats or 5
    args.cpu_warmup = args.cpu_warmup or 2
    probe = torch.zeros(1, 1)
    for name in ("token_logprobs", "opd_loss", "linear_opd_loss", "full_reverse_kl"):  # what "ours" runs here
        assert kernels._impl(name, probe, "auto") is getattr(kernels.reference, name), name

    command = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    print(f"# bench_kernel (CPU): {cpu_model()}, {cores} cores ({usable} usable, {torch.get_num_threads()} torch "
          f"threads), {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"\ncommand: `{command}`  ")
    print(f"torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}, "
          f"dtype {args.dtype}, {args.cpu_warmup} untimed run(s) (the first one memory-profiled) then "
          f"{args.cpu_repeats} timed runs (time.perf_counter), torch.compile timeout {args.compile_timeout:.0f} s, "
          f"load average at start {os.getloadavg()[0]:.2f}  ")
    print("ours = `kernels.*` with the default backend, which on CPU is the chunked torch reference "
          "(`kernels.reference`); Liger and Cut Cross-Entropy are Triton/CUDA-only. Peak extra MiB = peak bytes "
          "held by torch's CPU allocator during one forward + backward above the inputs (torch profiler, "
          "profile_memory). time / eager, time / compile, peak / eager: each row against the torch eager and "
          "torch.compile rows of the same shape (< 1x: less than eager). ours walks N in chunks of "
          f"{kernels.reference.DEFAULT_CHUNK_TOKENS} tokens, so at N <= {kernels.reference.DEFAULT_CHUNK_TOKENS} it "
          "is one chunk.  ")
    ceilings = cpu_ceilings(dtype)
    mm_text = ", ".join(f"{str(dt).removeprefix('torch.')} {tf:.2f}" for dt, tf in ceilings[1].items())
    print(f"measured ceilings: copy {ceilings[0]:.1f} GB/s (512 MiB fp32 copy, read + write), "
          f"matmul TFLOP/s (3072^3): {mm_text}; % matmul is against {args.dtype}")
    base_inputs = {}
    for op in args.ops:
        if op in ("linear_logprob", "linear_opd"):
            shapes = [(n, v, h) for n in args.n for v in args.v for h in args.h]
        else:  # H only shapes the inputs here: one H is enough
            shapes = [(n, v, min(args.h)) for n in args.n for v in args.v]
        run_op_cpu(op, shapes, args, dtype, ceilings, base_inputs)
    print(f"\nCPU run wall time: {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", default=None, choices=OPS,
                        help=f"default: all on cuda, {' '.join(CPU_OPS)} on cpu")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: cuda when a CUDA device is present, else cpu")
    parser.add_argument("--n", nargs="+", type=int, default=None,
                        help=f"packed tokens N (default {FULL_N} on cuda, {CPU_N} on cpu)")
    parser.add_argument("--v", nargs="+", type=int, default=None,
                        help=f"vocab sizes V (default {FULL_V} on cuda, {CPU_V} on cpu)")
    parser.add_argument("--h", nargs="+", type=int, default=None,
                        help=f"hidden sizes H (default {FULL_H} on cuda, {CPU_H} on cpu; logits ops take their logits "
                        "from hidden @ W^T, so H only shapes inputs)")
    parser.add_argument("--quick", action="store_true",
                        help="smallest shape only: N=4096, V=49152, H=576 on cuda; N=1024 and 3 timed runs on cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--logit-std", type=float, default=4.0, help="std of the synthetic logits")
    parser.add_argument("--warmup", type=float, default=100.0, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=float, default=500.0, help="do_bench rep, ms (raised to >= 10 runs)")
    parser.add_argument("--cpu-warmup", type=int, default=None,
                        help="cpu: untimed runs per candidate, the first memory-profiled (default 2; 1 with --quick)")
    parser.add_argument("--cpu-repeats", type=int, default=None,
                        help="cpu: timed runs per candidate (default 5; 3 with --quick)")
    parser.add_argument("--compile-timeout", type=float, default=120.0,
                        help="cpu: seconds torch.compile may take before its row reads 'not run'")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing candidates")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        main_cpu(args, dtype)
        return
    args.ops = args.ops or list(OPS)
    args.n, args.v, args.h = args.n or list(FULL_N), args.v or list(FULL_V), args.h or list(FULL_H)
    if not torch.cuda.is_available():
        sys.exit("bench_kernel.py needs a CUDA device (none found): the Triton kernels and every baseline run on the "
                 "GPU. On CPU, the correctness tests run the kernels through the interpreter: "
                 "TRITON_INTERPRET=1 pytest tests/test_kernels_triton.py")
    if args.quick:
        args.n, args.v, args.h = [min(FULL_N)], [min(FULL_V)], [min(FULL_H)]
    dtype = getattr(torch, args.dtype)
    import triton

    command = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])
    print(f"# bench_kernel: {torch.cuda.get_device_name()}, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"\ncommand: `{command}`  ")
    print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
          f"{platform.python_implementation()} {platform.python_version()}, dtype {args.dtype}, "
          f"do_bench warmup {args.warmup} ms, rep {args.rep} ms (>= 10 runs)  ")
    ceilings = device_ceilings(args.warmup, args.rep)
    print(f"measured ceilings: copy {ceilings[0]:.0f} GB/s (2 GiB D2D, read + write), "
          f"bf16 matmul {ceilings[1]:.0f} TFLOP/s (8192^3)")
    for op in args.ops:
        if op in ("linear_logprob", "linear_opd"):
            shapes = [(n, v, h) for n in args.n for v in args.v for h in args.h]
        else:  # H only shapes the inputs here: one H is enough
            shapes = [(n, v, min(args.h)) for n in args.n for v in args.v]
        run_op(op, shapes, args, dtype, ceilings)


if __name__ == "__main__":
    main()

"""The loss-kernel benchmark's runner: one loop over shapes and candidates, with a timer and a table per device.

CUDA: triton.testing.do_bench (explicit warmup/rep in ms; rep grows to >= 10 runs of a slow candidate, since
do_bench times a candidate slower than `rep` only once), peak extra memory from torch.cuda's allocator, and
ceilings from a 2 GiB device-to-device copy and an 8192^3 bf16 matmul; rows print as they finish, timed
against the first "ours" row. CPU: time.perf_counter median and p20/p80 over --cpu-repeats runs after
--cpu-warmup untimed ones, peak extra memory from the torch profiler's allocator events, ceilings from a
512 MiB tensor copy and a 3072^3 matmul; each shape's rows print together, timed against eager and compile.
The quantiles, the header's device and date are harness.py's, which every benchmark shares.
"""

from __future__ import annotations

import gc
import signal
import sys
import time
import traceback

import torch

from harness import quantile
from kernel_candidates import candidates
from kernel_inputs import LINEAR_OPS, build_inputs, make_linear_inputs, work

CUDA_ONLY = "needs CUDA (GPU-only kernels)"


class CompileTimeout(Exception):
    pass


# --- CUDA timing --------------------------------------------------------------------------------


def cuda_bench(step, args, kind):
    """((median, p20, p80) ms, peak extra bytes, None); rep grows so a slow step still gets >= 10 timed runs."""
    import triton.testing

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()  # warm-up: compiles, autotunes, allocates
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    once = start.elapsed_time(end)
    rep = max(args.rep, 10 * once)
    med, p20, p80 = triton.testing.do_bench(step, warmup=max(args.warmup, 2 * once), rep=rep,
                                            quantiles=[0.5, 0.2, 0.8])
    return (med, p20, p80), peak, None


def cuda_ceilings(args, dtype):
    """Measured copy GB/s (2 GiB device-to-device) and bf16 matmul TFLOP/s (8192^3) on this device."""
    import triton.testing

    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=args.warmup, rep=args.rep, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    copy_gbs = 2 * src.numel() * 2 / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=args.warmup, rep=args.rep, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    mm_tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return copy_gbs, mm_tflops


# --- CPU timing ---------------------------------------------------------------------------------


def cpu_peak_extra_bytes(step):
    """Peak bytes held by torch's CPU allocator during one step, above what was allocated when the step began.

    The torch profiler with profile_memory=True records every allocation and free made through c10's CPU
    allocator (eager ops, autograd buffers and the buffers torch.compile'd code allocates alike) as a
    "[memory]" event with a signed byte count; their running sum in time order, maximised, is the CPU
    counterpart of torch.cuda.max_memory_allocated() - memory_allocated() on CUDA. It does not see
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


def cpu_time(fn, repeats):
    """(median, p20, p80) ms of `fn` over `repeats` runs, time.perf_counter around each call."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return quantile(times, 0.5), quantile(times, 0.2), quantile(times, 0.8)


def run_with_timeout(fn, seconds):
    """Call fn(); raise CompileTimeout in this (main) thread if it runs past `seconds`."""

    def on_alarm(signum, frame):
        raise CompileTimeout(f"compile > {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cpu_bench(step, args, kind):
    """((median, p20, p80) ms, peak extra bytes, compile s or None); raises CompileTimeout for a slow compile.

    Untimed runs first: for torch.compile the compiling call (under --compile-timeout), then the memory-profiled
    run, then --cpu-warmup - 1 plain runs; then --cpu-repeats timed runs.
    """
    compile_s = None
    if kind == "compile":
        t0 = time.perf_counter()
        run_with_timeout(step, args.compile_timeout)
        compile_s = time.perf_counter() - t0
        if compile_s > args.compile_timeout:  # an alarm swallowed somewhere inside the compiler
            raise CompileTimeout(f"compile took {compile_s:.0f} s > {args.compile_timeout:g} s")
    peak = cpu_peak_extra_bytes(step)
    for _ in range(args.cpu_warmup - 1):
        step()
    return cpu_time(step, args.cpu_repeats), peak, compile_s


def cpu_ceilings(args, dtype):
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


def is_oom(exc):
    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in str(exc)


# --- tables -------------------------------------------------------------------------------------


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


class CudaTable:
    """Rows print as they finish (a timed-out run still shows what it measured), timed against "ours"."""

    width = 9
    progress = False  # stdout is the table (scripts/gpu_check.sh keeps it as bench.log)

    def __init__(self, op, ceilings, flops_dtype):
        self.copy_gbs, self.mm_tflops = ceilings
        print(f"\n### {op}\n")
        print("| N | V | H | implementation | median ms | p20 ms | p80 ms | time / ours | peak extra MiB | GB/s "
              "| % copy BW | TFLOP/s | % matmul |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        self.ours_ms = None

    def start_shape(self):
        self.ours_ms = None

    def add(self, prefix, name, kind, result, status, nbytes, flops):
        if status is None:
            (med, p20, p80), peak, _ = result
            if self.ours_ms is None and kind == "ours":
                self.ours_ms = med
            gbs = nbytes / (med * 1e-3) / 1e9
            tflops = None if flops is None else flops / (med * 1e-3) / 1e12
            cells = [f"{med:.3f}", f"{p20:.3f}", f"{p80:.3f}",
                     f"{med / self.ours_ms:.2f}x" if self.ours_ms else "-", f"{peak / 2**20:.0f}",
                     f"{gbs:.0f}", f"{100 * gbs / self.copy_gbs:.0f}%", fmt(tflops, ".0f"),
                     "-" if tflops is None else f"{100 * tflops / self.mm_tflops:.0f}%"]
        else:
            cells = [status] + [""] * (self.width - 1)
        print(f"{prefix}{name} | " + " | ".join(cells) + " |", flush=True)

    def end_shape(self, prefix_blank, stats):
        print(f"{prefix_blank}inputs: {stats} | | | | | | | | | |", flush=True)


class CpuTable:
    """A shape's rows print together, each timed against the torch eager and torch.compile rows."""

    width = 11
    progress = True  # a line per candidate on stderr: CPU rows print only once their shape is done

    def __init__(self, op, ceilings, flops_dtype):
        self.copy_gbs, mm = ceilings
        self.mm_tflops = mm[flops_dtype]
        print(f"\n### {op} (CPU)\n")
        print("| N | V | H | implementation | median ms | p20 ms | p80 ms | time / eager | time / compile "
              "| peak extra MiB | peak / eager | GB/s | % copy BW | TFLOP/s | % matmul |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        self.rows = []

    def start_shape(self):
        self.rows = []

    def add(self, prefix, name, kind, result, status, nbytes, flops):
        if status is None and result[2] is not None:
            name = f"{name} (compile {result[2]:.0f} s)"
        self.rows.append((prefix, name, kind, result, status, nbytes, flops))

    def end_shape(self, prefix_blank, stats):
        ref = {kind: result for _, _, kind, result, status, _, _ in self.rows
               if status is None and kind in ("eager", "compile")}
        eager_ms = ref["eager"][0][0] if "eager" in ref else None
        eager_peak = ref["eager"][1] if "eager" in ref else None
        compile_ms = ref["compile"][0][0] if "compile" in ref else None
        for prefix, name, kind, result, status, nbytes, flops in self.rows:
            if status is not None:
                cells = [status] + [""] * (self.width - 1)
            else:
                (med, p20, p80), peak, _ = result
                gbs = nbytes / (med * 1e-3) / 1e9
                tflops = None if flops is None else flops / (med * 1e-3) / 1e12
                cells = [f"{med:.1f}", f"{p20:.1f}", f"{p80:.1f}",
                         f"{med / eager_ms:.2f}x" if eager_ms else "-",
                         f"{med / compile_ms:.2f}x" if compile_ms else "-",
                         f"{peak / 2**20:.0f}",
                         f"{peak / eager_peak:.2f}x" if eager_peak else "-",
                         f"{gbs:.1f}", f"{100 * gbs / self.copy_gbs:.0f}%", fmt(tflops, ".3f"),
                         "-" if tflops is None else f"{100 * tflops / self.mm_tflops:.0f}%"]
            print(f"{prefix}{name} | " + " | ".join(cells) + " |", flush=True)
        print(f"{prefix_blank}inputs: {stats} |" + " |" * self.width, flush=True)


DEVICES = {
    # device: (timer, ceilings, table, reuse each shape's sampled inputs across ops)
    "cuda": (cuda_bench, cuda_ceilings, CudaTable, False),
    "cpu": (cpu_bench, cpu_ceilings, CpuTable, True),
}


# --- the runner ---------------------------------------------------------------------------------


def free_memory(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def failure(exc, kind, device, args):
    """The status cell of a candidate that raised."""
    if isinstance(exc, ImportError):
        return f"not installed ({exc.name or exc})"
    if isinstance(exc, CompileTimeout):
        return f"not run ({exc})"
    if args.verbose:
        traceback.print_exc()
    if is_oom(exc):
        return "OOM"
    first = str(exc).splitlines()[0][:80].replace("|", "/") if str(exc) else ""
    if kind == "compile" and device == "cpu":
        return f"not run (compile failed: {type(exc).__name__}: {first})"
    return f"error: {type(exc).__name__}: {first}"


def run_op(op, shapes, args, dtype, device, ceilings, base_inputs):
    """One table: every (N, V, H) of `shapes`, every candidate of `op` that this device shows."""
    timer, _, table_cls, reuse_inputs = DEVICES[device]
    table = table_cls(op, ceilings, dtype)
    elem = torch.finfo(dtype).bits // 8
    for n, v, h in shapes:
        label = h if op in LINEAR_OPS else f"({h})"
        prefix, prefix_blank = f"| {n} | {v} | {label} | ", f"| {n} | {v} | | "
        try:
            base = None
            if reuse_inputs:  # sampled once per shape, shared by the ops (small: no [N, V] kept)
                if (n, v, h) not in base_inputs:
                    base_inputs[n, v, h] = make_linear_inputs(n, v, h, args.logit_std, dtype, device=device)
                hidden, weight, targets, lp, stats = base_inputs[n, v, h]
                # detach(): fresh leaf tensors per op, so requires_grad_ here does not leak into the cached ones
                base = (hidden.detach(), weight.detach(), targets, lp, stats)
            x, stats = build_inputs(op, n, v, h, args, dtype, base=base)
        except (RuntimeError, MemoryError) as exc:
            if not is_oom(exc):
                raise
            print(f"{prefix}(inputs) | OOM building inputs |" + " |" * (table_cls.width - 1))
            free_memory(device)
            continue
        nbytes, flops = work(op, n, v, h, elem)
        table.start_shape()
        for candidate in candidates(op):
            kind = candidate.kind
            if device not in candidate.devices:
                if kind != "ours-path":  # our own GPU-only paths: "ours" is that path here
                    table.add(prefix, candidate.label(device), kind, None, CUDA_ONLY, nbytes, flops)
                    if table.progress:
                        print(f"[{device}] {op} N={n} V={v} H={h}: {candidate.label(device)}: {CUDA_ONLY}",
                              file=sys.stderr, flush=True)
                continue
            name, t0 = candidate.label(device), time.perf_counter()
            result = status = step = None
            try:
                step = candidate.build(x)
                result = timer(step, args, kind)
            except Exception as exc:  # one broken candidate must not sink the table
                status = failure(exc, kind, device, args)
            step = None
            free_memory(device)
            table.add(prefix, name, kind, result, status, nbytes, flops)
            if table.progress:
                print(f"[{device}] {op} N={n} V={v} H={h}: {name}: {status or 'done'} "
                      f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        table.end_shape(prefix_blank, stats)
        del x
        free_memory(device)

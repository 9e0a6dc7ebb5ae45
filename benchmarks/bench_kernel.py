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
The inputs are in kernel_inputs.py, the candidates (each declared once, with the devices it runs on) in
kernel_candidates.py, the runner, timers and tables in kernel_runner.py (on harness.py, which every
benchmark shares).

CPU mode (automatic without a CUDA device, or --device cpu) runs the same comparison with the candidates that
exist on a CPU: ours = the `kernels.*` entries with the default backend (the chunked torch path on CPU),
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
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import command_line, cpu_model, timestamp  # noqa: E402
from kernel_candidates import OPS  # noqa: E402
from kernel_inputs import op_shapes  # noqa: E402
from kernel_runner import DEVICES, run_op  # noqa: E402

FULL_N, FULL_V, FULL_H = (4096, 16384, 65536), (49152, 151936), (576, 4096)
# Sized so the default CPU run takes about 4 minutes on 2 cores: N = 2048 is two chunks of the torch path's
# DEFAULT_CHUNK_TOKENS = 1024 (at N <= 1024 ours is one chunk and holds as much as eager). linear_logprob and kl
# are left to --ops: at N = 1024 they add about 1 and 1.5 minutes (the chunked reverse KL is ~5x eager's time).
CPU_OPS = ("logprob", "opd", "linear_opd")
CPU_N, CPU_V, CPU_H = (1024, 2048), (49152,), (576,)


def run_tables(args, dtype, device):
    """Measure this device's ceilings, then print one table per op."""
    ceilings = DEVICES[device][1](args, dtype)
    if device == "cuda":
        print(f"measured ceilings: copy {ceilings[0]:.0f} GB/s (2 GiB D2D, read + write), "
              f"bf16 matmul {ceilings[1]:.0f} TFLOP/s (8192^3)")
    else:
        mm_text = ", ".join(f"{str(dt).removeprefix('torch.')} {tf:.2f}" for dt, tf in ceilings[1].items())
        print(f"measured ceilings: copy {ceilings[0]:.1f} GB/s (512 MiB fp32 copy, read + write), "
              f"matmul TFLOP/s (3072^3): {mm_text}; % matmul is against {args.dtype}")
    base_inputs = {}
    for op in args.ops:
        run_op(op, op_shapes(op, args.n, args.v, args.h), args, dtype, device, ceilings, base_inputs)


DEFAULT_GRID = {"cuda": (OPS, FULL_N, FULL_V, FULL_H), "cpu": (CPU_OPS, CPU_N, CPU_V, CPU_H)}


def settle_defaults(args, device):
    """Fill what the command line left open with this device's defaults; --quick keeps the smallest shape."""
    ops, ns, vs, hs = DEFAULT_GRID[device]
    if args.quick:
        args.n, args.v, args.h = [min(ns)], [min(vs)], [min(hs)]
        if device == "cpu":
            args.cpu_repeats = args.cpu_repeats or 3
            args.cpu_warmup = args.cpu_warmup or 1
    args.ops = args.ops or list(ops)
    args.n, args.v, args.h = args.n or list(ns), args.v or list(vs), args.h or list(hs)
    args.cpu_repeats = args.cpu_repeats or 5
    args.cpu_warmup = args.cpu_warmup or 2


def print_header(args, device):
    """Device, date, the exact command, versions and how each cell was measured."""
    command, now = command_line(), timestamp()
    python = f"{platform.python_implementation()} {platform.python_version()}"
    if device == "cuda":
        import triton

        print(f"# bench_kernel: {torch.cuda.get_device_name()}, {now}")
        print(f"\ncommand: `{command}`  ")
        print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
              f"{python}, dtype {args.dtype}, do_bench warmup {args.warmup} ms, rep {args.rep} ms (>= 10 runs)  ")
        return
    import kernels

    probe = torch.zeros(1, 1)
    for name in ("token_logprobs", "opd_loss", "linear_opd_loss", "full_reverse_kl"):  # what "ours" runs here
        assert kernels._impl(name, probe, "auto") is getattr(kernels.torch_ops, name), name
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    print(f"# bench_kernel (CPU): {cpu_model()}, {cores} cores ({usable} usable, {torch.get_num_threads()} torch "
          f"threads), {now}")
    print(f"\ncommand: `{command}`  ")
    print(f"torch {torch.__version__}, {python}, "
          f"dtype {args.dtype}, {args.cpu_warmup} untimed run(s) (the first one memory-profiled) then "
          f"{args.cpu_repeats} timed runs (time.perf_counter), torch.compile timeout {args.compile_timeout:.0f} s, "
          f"load average at start {os.getloadavg()[0]:.2f}  ")
    chunk = kernels.torch_ops.DEFAULT_CHUNK_TOKENS
    print("ours = `kernels.*` with the default backend, which on CPU is the chunked torch path "
          "(`kernels.torch_ops`); Liger and Cut Cross-Entropy are Triton/CUDA-only. Peak extra MiB = peak bytes "
          "held by torch's CPU allocator during one forward + backward above the inputs (torch profiler, "
          "profile_memory). time / eager, time / compile, peak / eager: each row against the torch eager and "
          "torch.compile rows of the same shape (< 1x: less than eager). ours walks N in chunks of "
          f"{chunk} tokens, so at N <= {chunk} it is one chunk.  ")


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

    device = "cpu" if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()) else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_kernel.py needs a CUDA device (none found): the Triton kernels and every baseline run on the "
                 "GPU. On CPU, the correctness tests run the kernels through the interpreter: "
                 "TRITON_INTERPRET=1 pytest tests/test_kernel_*.py -m triton")
    settle_defaults(args, device)
    started = time.perf_counter()
    print_header(args, device)
    run_tables(args, getattr(torch, args.dtype), device)
    if device == "cpu":
        print(f"\nCPU run wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

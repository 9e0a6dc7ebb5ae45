"""After a run: charts (RUN_DIR/charts/*.png) and a markdown summary (RUN_DIR/summary.md) from metrics.jsonl.

Eval keys appear only on eval steps, so each series is plotted against the steps where it was logged.
"""

from __future__ import annotations

import math
from pathlib import Path

from opd_local.metrics import read_metrics

# held-out first, then the same on training rows (dashed in the chart)
TRACE_GAP_KEYS = ("eval/trace_gap", "eval/trace_gap_final", "eval/trace_gap_train", "eval/trace_gap_final_train")
STAGE_KEYS = ("time/sample", "time/score", "time/train", "time/push", "time/eval")
SUMMARY_METRICS = (
    "eval/trace_gap",
    "eval/trace_gap_pre_final",
    "eval/trace_gap_final",
    "eval/trace_gap_train",
    "eval/trace_gap_pre_final_train",
    "eval/trace_gap_final_train",
    "eval/student_greedy_accuracy",
    "opd/sampled_reverse_kl",
)


def to_float(value) -> float:
    """A logged value as a float; metrics._jsonable writes non-finite floats as "nan"/"inf" strings."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) over the records that carry `key`; NaN stays NaN (a gap in the line)."""
    steps, values = [], []
    for record in records:
        if key in record:
            steps.append(record["step"])
            values.append(to_float(record[key]))
    return steps, values


def first_last(records: list[dict], key: str) -> tuple[tuple[int, float] | None, tuple[int, float] | None]:
    """The first and last finite (step, value) of `key`, or None when it never has a finite value."""
    points = [(s, v) for s, v in zip(*series(records, key)) if math.isfinite(v)]
    return (points[0], points[-1]) if points else (None, None)


def has_values(records: list[dict], keys) -> bool:
    return any(first_last(records, key)[0] is not None for key in keys)


def write_charts(run_dir: str | Path) -> list[Path]:
    """Write the charts whose keys were logged into RUN_DIR/charts/ and return their paths."""
    # Imported here, at the end of a run: half a second of every start-up otherwise, for every rank.
    # No pyplot: no global figure state, no display, Agg on savefig.
    from matplotlib.figure import Figure
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    chart_dir = run_dir / "charts"
    written = []
    for name, draw, keys in CHARTS:
        if not has_values(records, keys):
            continue
        chart_dir.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
        draw(fig.add_subplot(), records)
        path = chart_dir / name
        fig.savefig(path, format="png")
        written.append(path)
    return written


def _plot_lines(ax, records: list[dict], keys, title: str, ylabel: str) -> None:
    for key in keys:
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, marker="o", markersize=4, linestyle="--" if key.endswith("_train") else "-", label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def draw_trace_gap(ax, records: list[dict]) -> None:
    ax.axhline(0.0, color="black", linewidth=0.8)
    _plot_lines(ax, records, TRACE_GAP_KEYS, "teacher-trace NLL gap, student − teacher (held-out solid, train dashed)", "nats / token")


def draw_greedy_accuracy(ax, records: list[dict]) -> None:
    _, teacher = first_last(records, "eval/teacher_final_accuracy")
    if teacher is not None:
        ax.axhline(teacher[1], color="gray", linestyle=":", label=f"eval/teacher_final_accuracy ({teacher[1]:.2f})")
    _plot_lines(ax, records, ["eval/student_greedy_accuracy"], "student greedy exact-match accuracy (held-out)", "accuracy")
    ax.set_ylim(-0.02, 1.02)


def draw_sampled_reverse_kl(ax, records: list[dict]) -> None:
    ax.axhline(0.0, color="black", linewidth=0.8)
    _plot_lines(ax, records, ["opd/sampled_reverse_kl"], "sampled reverse KL, mean of rollout_lp − teacher_lp", "nats / token")


def draw_active_tokens(ax, records: list[dict]) -> None:
    steps, values = series(records, "opd/active_tokens")
    ax.bar(steps, [0.0 if math.isnan(v) else v for v in values], color="tab:blue")
    ax.set_title("active tokens per step (completion tokens that carried loss)")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens")
    ax.grid(alpha=0.3, axis="y")


def draw_stage_times(ax, records: list[dict]) -> None:
    steps = [r["step"] for r in records]
    bottom = [0.0] * len(records)
    for key in STAGE_KEYS:
        if not any(key in r for r in records):
            continue
        # a stage missing on a step (eval runs only every eval_every steps) stacks as 0 there
        heights = [to_float(r.get(key, 0.0)) for r in records]
        heights = [h if math.isfinite(h) else 0.0 for h in heights]
        ax.bar(steps, heights, bottom=bottom, label=key)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_title("seconds per stage")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


CHARTS = (
    ("trace_gap.png", draw_trace_gap, TRACE_GAP_KEYS),
    ("greedy_accuracy.png", draw_greedy_accuracy, ["eval/student_greedy_accuracy"]),
    ("sampled_reverse_kl.png", draw_sampled_reverse_kl, ["opd/sampled_reverse_kl"]),
    ("active_tokens.png", draw_active_tokens, ["opd/active_tokens"]),
    ("stage_times.png", draw_stage_times, list(STAGE_KEYS)),
)


def format_value(value: float) -> str:
    return f"{value:.4g}"


def percent_change(start: float | None, end: float | None) -> str:
    if start is None or end is None or start == 0:
        return "n/a"
    return f"{(end - start) / abs(start) * 100:+.1f}%"


def format_minutes(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def run_total(records: list[dict], total_key: str, per_step_key: str) -> float:
    """The cumulative key of the last record, else the sum of the per-step key."""
    if records and total_key in records[-1]:
        return to_float(records[-1][total_key])
    return sum(v for v in series(records, per_step_key)[1] if math.isfinite(v))


def summary_table(run_dir: str | Path) -> str:
    """Markdown: start, end and % change of the headline metrics, then run totals."""
    records = read_metrics(Path(run_dir))
    lines = ["| metric | start | end | change |", "|---|---|---|---|"]
    for key in SUMMARY_METRICS:
        first, last = first_last(records, key)
        start = f"{format_value(first[1])} (step {first[0]})" if first else "n/a"
        end = f"{format_value(last[1])} (step {last[0]})" if last else "n/a"
        change = percent_change(first and first[1], last and last[1])
        lines.append(f"| `{key}` | {start} | {end} | {change} |")

    groups = [run_total(records, f"groups/{kind}_total", f"groups/{kind}") for kind in ("sampled", "filtered", "failed")]
    active = run_total(records, "opd/active_tokens_total", "opd/active_tokens")
    wall = sum(v for key in ("time/step", "time/eval") for v in series(records, key)[1] if math.isfinite(v))
    lines += [
        "",
        "| total | value |",
        "|---|---|",
        f"| steps logged | {len(records)} |",
        "| groups sampled / filtered / failed | " + " / ".join(f"{g:.0f}" for g in groups) + " |",
        f"| active tokens | {active:.0f} |",
        f"| wall time (steps + eval), m:ss | {format_minutes(wall)} |",
    ]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> str:
    """Write RUN_DIR/charts/*.png and RUN_DIR/summary.md (the table plus the charts); return the table."""
    run_dir = Path(run_dir)
    charts = write_charts(run_dir)
    table = summary_table(run_dir)
    images = "".join(f"![{p.stem}](charts/{p.name})\n" for p in charts)
    (run_dir / "summary.md").write_text(f"# Run summary: {run_dir.name}\n\n{table}\n{images}")
    return table

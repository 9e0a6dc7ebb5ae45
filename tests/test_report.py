"""Report and loggers: charts are real PNGs, the summary's numbers match a hand computation, absent keys
are skipped, TensorBoard reads back what was logged, and a missing wandb fails loudly."""

import json
import math
import subprocess
import sys

import matplotlib.image
import pytest

from opd_local.metrics import MetricsLogger
from opd_local.report import summary_table, write_charts, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHARTS = ["trace_gap.png", "greedy_accuracy.png", "sampled_reverse_kl.png", "active_tokens.png", "stage_times.png"]
EVAL_STEPS = (0, 3, 5)
TRACE_GAP = {0: 1.25, 3: 0.75, 5: 0.5}  # held-out eval/trace_gap at the eval steps


def synthetic_records(steps: int = 6) -> list[dict]:
    """What the loop logs: training keys every step, eval keys at step 0 (before training) and every few steps."""
    records = []
    sampled = filtered = failed = active_total = 0
    for step in range(steps):
        active = 100 + 10 * step
        sampled, filtered, failed, active_total = sampled + 3, filtered + 1, failed + (step == 2), active_total + active
        record = {
            "step": step,
            "opd/sampled_reverse_kl": "nan" if step == 2 else 0.4 - 0.05 * step,  # a step with no active tokens
            "opd/active_tokens": active,
            "groups/sampled": 3,
            "groups/sampled_total": sampled,
            "groups/filtered_total": filtered,
            "groups/failed_total": failed,
            "opd/active_tokens_total": active_total,
            "time/sample": 5.0,
            "time/score": 1.0,
            "time/train": 3.0,
            "time/push": 0.5,
            "time/step": 10.0,
        }
        if step in EVAL_STEPS:
            record.update({
                "eval/trace_gap": TRACE_GAP[step],
                "eval/trace_gap_pre_final": TRACE_GAP[step] + 0.1,
                "eval/trace_gap_final": 2.0 - step * 0.5,
                "eval/trace_gap_train": TRACE_GAP[step] - 0.2,
                "eval/trace_gap_pre_final_train": TRACE_GAP[step],
                "eval/trace_gap_final_train": 1.5 - step * 0.5,
                "eval/student_greedy_accuracy": 0.0 if step == 0 else step / 10,
                "eval/teacher_final_accuracy": 0.75,
                "time/eval": 20.0,
            })
        records.append(record)
    return records


def write_run(run_dir, records) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def table_row(table: str, key: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| `{key}` |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_write_report_makes_five_valid_pngs_and_summary(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, synthetic_records())
    table = write_report(run_dir)

    for name in CHARTS:
        path = run_dir / "charts" / name
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, name
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4), name
    summary = (run_dir / "summary.md").read_text()
    assert table in summary and "charts/trace_gap.png" in summary


def test_summary_table_start_end_and_change(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, synthetic_records())
    table = summary_table(run_dir)

    start, end = TRACE_GAP[0], TRACE_GAP[5]
    change = (end - start) / abs(start) * 100  # -60.0
    assert table_row(table, "eval/trace_gap")[1:] == [f"{start:.4g} (step 0)", f"{end:.4g} (step 5)", f"{change:+.1f}%"]
    assert table_row(table, "eval/trace_gap")[3] == "-60.0%"
    # start 0 has no relative change
    assert table_row(table, "eval/student_greedy_accuracy")[1:] == ["0 (step 0)", "0.5 (step 5)", "n/a"]
    # the "nan" of step 2 is skipped, not propagated
    kl_row = table_row(table, "opd/sampled_reverse_kl")
    assert kl_row[1:3] == ["0.4 (step 0)", f"{0.4 - 0.25:.4g} (step 5)"]
    assert "nan" not in table.lower()

    assert "| groups sampled / filtered / failed | 18 / 6 / 1 |" in table
    assert f"| active tokens | {sum(100 + 10 * s for s in range(6))} |" in table
    wall = 6 * 10.0 + 3 * 20.0  # time/step on every step, time/eval on the eval steps: 120 s
    assert f"| wall time (steps + eval), m:ss | {int(wall) // 60}:{int(wall) % 60:02d} |" in table  # 2:00


def test_absent_keys_skip_charts_without_crashing(tmp_path):
    run_dir = tmp_path / "run"
    keep = {"step", "opd/active_tokens", "time/sample", "time/step"}  # no eval, no KL, no totals
    write_run(run_dir, [{k: v for k, v in r.items() if k in keep} for r in synthetic_records(3)])
    charts = write_charts(run_dir)
    assert sorted(p.name for p in charts) == ["active_tokens.png", "stage_times.png"]
    assert sorted(p.name for p in (run_dir / "charts").iterdir()) == ["active_tokens.png", "stage_times.png"]
    table = write_report(run_dir)
    assert table_row(table, "eval/trace_gap")[1:] == ["n/a", "n/a", "n/a"]
    assert f"| active tokens | {100 + 110 + 120} |" in table  # summed per step when the total key is absent

    empty = tmp_path / "empty"
    write_run(empty, [])
    assert write_charts(empty) == []
    assert "| groups sampled / filtered / failed | 0 / 0 / 0 |" in summary_table(empty)


def test_metrics_logger_writes_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path)
    logged = {0: 0.5, 1: 0.25, 2: float("nan")}
    for step, kl in logged.items():
        logger.log(step, {"opd/sampled_reverse_kl": kl, "opd/active_tokens": 100 + step, "note": "text is skipped"})
    logger.close()

    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(events) == 1 and (tmp_path / "metrics.jsonl").is_file()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"opd/sampled_reverse_kl", "opd/active_tokens"}
    kl = {e.step: e.value for e in acc.Scalars("opd/sampled_reverse_kl")}
    assert kl[0] == 0.5 and kl[1] == 0.25 and math.isnan(kl[2])
    assert [(e.step, e.value) for e in acc.Scalars("opd/active_tokens")] == [(0, 100.0), (1, 101.0), (2, 102.0)]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=False)
    logger.log(0, {"opd/active_tokens": 1})
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_wandb_without_wandb_installed_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(tmp_path, wandb_project="opd-local")
    with pytest.raises(ImportError, match="pip install wandb"):  # every rank refuses, not only the main one
        MetricsLogger(tmp_path, enabled=False, wandb_project="opd-local")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_plot_script_prints_table_and_chart_paths(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, synthetic_records())
    out = subprocess.run(
        [sys.executable, "scripts/plot.py", str(run_dir)], capture_output=True, text=True, check=True
    ).stdout
    assert "| `eval/trace_gap` |" in out
    for name in CHARTS:
        assert str(run_dir / "charts" / name) in out

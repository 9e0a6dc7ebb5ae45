"""The ablation sweep: grid expansion and checks, the table's arithmetic, and restart without re-running."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml


def _load_script(name: str):
    """A module of scripts/, which is not a package: loaded from its file, as scripts/ablate.py imports it."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


sweep = _load_script("sweep")
load_grid, pending_runs, results_table = sweep.load_grid, sweep.pending_runs, sweep.results_table
run_summary, run_sweep, write_results = sweep.run_summary, sweep.run_sweep, sweep.write_results


def write_grid(tmp_path, base, axes, seeds) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "sweep"), "base": base, "axes": axes, "seeds": seeds}))
    return str(path)


def fake_run(run_dir, gaps: dict[int, float], step_seconds=10.0, eval_seconds=3.0, wall=100.0):
    run_dir.mkdir(parents=True)
    records = []
    for step in range(max(gaps) + 1):
        record = {"step": step, "time/step": step_seconds, "opd/active_tokens": 50}
        if step in gaps:
            record.update({"eval/trace_gap": gaps[step], "eval/trace_gap_final": 2 * gaps[step], "time/eval": eval_seconds})
            record["eval/student_greedy_accuracy"] = 0.25
        records.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "done.json").write_text(json.dumps({"wall_seconds": wall}))


def test_grid_expands_axes_times_seeds_and_refuses_bad_keys(tmp_path):
    grid = load_grid(write_grid(tmp_path, {"run": {"steps": 3}}, {"loss.objective": ["sampled_rkl", "fkl"], "model.teacher_context": ["privileged", "plain"]}, [0, 1]))
    assert [v.name for v in grid.variants] == [
        "objective=sampled_rkl,teacher_context=privileged",
        "objective=sampled_rkl,teacher_context=plain",
        "objective=fkl,teacher_context=privileged",
        "objective=fkl,teacher_context=plain",
    ]
    assert len({d for v in grid.variants for d in v.runs}) == 8
    with pytest.raises(ValueError, match="unknown key loss.objectiv"):
        load_grid(write_grid(tmp_path, {}, {"loss.objectiv": ["fkl"]}, [0]))
    with pytest.raises(ValueError, match="section.key"):
        load_grid(write_grid(tmp_path, {}, {"objective": ["fkl"]}, [0]))


def test_table_reports_mean_std_and_when_the_gap_fell_20_percent(tmp_path):
    grid = load_grid(write_grid(tmp_path, {}, {"loss.objective": ["sampled_rkl"]}, [0, 1]))
    first, second = grid.variants[0].runs
    fake_run(first, {0: 1.0, 2: 0.85, 4: 0.7})  # -20% first reached at the step-4 eval
    fake_run(second, {0: 1.0, 2: 0.9, 4: 0.9}, wall=140.0)  # never
    row = run_summary(first)
    assert row["steps_to_20pct"] == 4
    assert row["seconds_to_20pct"] == 4 * 10.0 + 3 * 3.0  # steps 0-3 trained, evals at 0, 2, 4
    assert row["trace_gap_best"] == 0.7 and row["trace_gap_final_end"] == 1.4
    assert row["active_tokens"] == 250
    table = results_table(grid)
    line = next(line for line in table.splitlines() if line.startswith("| objective=sampled_rkl"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == f"{statistics.fmean([0.7, 0.9]):.3f} ± {statistics.stdev([0.7, 0.9]):.3f}"
    assert cells[7] == "4 (1/2)"
    assert cells[-1] == "120 ± 28"


def test_sweep_restart_runs_only_unfinished_variants(tmp_path, tiny_model_dir):
    base = {
        "model": {"student": tiny_model_dir},
        "data": {"max_train_rows": 8, "max_heldout_rows": 2},
        "rollout": {"sampler": "hf", "groups_per_step": 1, "samples_per_group": 2, "max_tokens": 8},
        "run": {"steps": 1, "save_every": 0, "save_final": False, "device": "cpu"},
        "eval": {"every": 1, "train_rows": 1, "max_trace_tokens": 8, "greedy_max_tokens": 8},
    }
    grid = load_grid(write_grid(tmp_path, base, {"loss.objective": ["sampled_rkl", "full_rkl"]}, [0]))
    messages: list[str] = []
    run_sweep(grid, log=messages.append)
    assert messages[0].startswith("2 of 2 runs to do") and not pending_runs(grid)
    done = {d: (d / "done.json").stat().st_mtime_ns for v in grid.variants for d in v.runs}
    metrics = {d: (d / "metrics.jsonl").read_text() for d in done}

    # A run killed before it finished: no done.json, so only it runs again.
    killed = grid.variants[1].runs[0]
    first_attempt = json.loads((killed / "done.json").read_text())["wall_seconds"]
    (killed / "done.json").unlink()
    # ... and a launch before that which died with the sweep: it logged for 50 s and recorded nothing.
    log_end = (killed / "train.log").stat().st_mtime
    with open(killed / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"start": log_end - 50.0, "seconds": None}) + "\n")
    messages.clear()
    run_sweep(load_grid(write_grid(tmp_path, base, {"loss.objective": ["sampled_rkl", "full_rkl"]}, [0])), log=messages.append)
    assert messages[0].startswith("1 of 2 runs to do")
    finished = grid.variants[0].runs[0]
    assert (finished / "done.json").stat().st_mtime_ns == done[finished]
    assert (finished / "metrics.jsonl").read_text() == metrics[finished]
    resumed = json.loads((killed / "done.json").read_text())
    assert resumed["attempts"] == 3
    assert resumed["wall_seconds"] > first_attempt + 50.0  # the killed launches count towards the run's time

    table = write_results(grid)
    assert "not run yet" not in table and (grid.out_dir / "trace_gap.png").stat().st_size > 0
    for variant in grid.variants:
        assert f"| {variant.name} | " in table

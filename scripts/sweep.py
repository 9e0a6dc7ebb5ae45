"""Ablation sweeps: a base config, the axes to vary and the seeds -> one run per (variant, seed),
one markdown table (mean ± std over seeds) and one overlay chart of the held-out trace gap.

A grid file:

    out_dir: runs/ablate/privileged-vs-plain
    base:                       # config overrides by section, as in a train.py --config file
      run: {steps: 8}
    axes:                       # section.key: values; the variants are their cross product
      model.teacher_context: [privileged, plain]
      loss.objective: [sampled_rkl, full_rkl]
    seeds: [0, 1]

Each run is `scripts/train.py` in its own process (its own engine and memory), writing to
OUT_DIR/VARIANT/seed-N; a run that finished has a `done.json` there and is not run again when the
sweep restarts; one that was killed resumes from its latest checkpoint.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from opd_local.config import Config
from opd_local.config_files import save_yaml
from opd_local.config_parsing import apply_overrides
from opd_local.metrics import read_metrics
from opd_local.report import run_total, series, to_float

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
GAP_DROP = 0.2  # "steps and time to a 20% gap reduction"


@dataclass
class Variant:
    name: str  # e.g. "teacher_context=plain,objective=full_rkl"
    overrides: dict[str, dict]  # section -> key -> value, applied over the base
    runs: list[Path] = field(default_factory=list)  # one run directory per seed


@dataclass
class Grid:
    out_dir: Path
    base: dict[str, dict]
    axes: dict[str, list]
    seeds: list[int]
    variants: list[Variant]


def _split_key(key: str) -> tuple[str, str]:
    section, sep, name = key.partition(".")
    if not sep or not name:
        raise ValueError(f"grid axis {key!r} must be section.key, e.g. loss.objective")
    return section, name


def _slug(value) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(value))


def variant_config(grid: Grid, variant: Variant, seed: int, run_dir: Path) -> Config:
    cfg = apply_overrides(Config(), grid.base, "grid base")
    cfg = apply_overrides(cfg, variant.overrides, f"grid variant {variant.name}")
    cfg.run.seed = seed
    cfg.run.out_dir = str(run_dir)
    cfg.run.resume = ""
    return cfg


def load_grid(path: str | Path, out_dir: str | None = None) -> Grid:
    """Read and check a grid file; every variant's config is built here, so a bad key fails before any run."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(spec) - {"out_dir", "base", "axes", "seeds"}
    if unknown:
        raise ValueError(f"{path}: unknown grid keys {sorted(unknown)}; known: out_dir, base, axes, seeds")
    axes = spec.get("axes") or {}
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise ValueError(f"{path}: axes must map section.key to a non-empty list of values")
    seeds = [int(s) for s in spec.get("seeds", [0])]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"{path}: seeds must be a non-empty list of distinct integers, got {seeds}")
    root = Path(out_dir or spec.get("out_dir") or f"runs/ablate/{Path(path).stem}")
    grid = Grid(root, spec.get("base") or {}, axes, seeds, [])
    for values in itertools.product(*axes.values()):
        overrides: dict[str, dict] = {}
        parts = []
        for key, value in zip(axes, values):
            section, name = _split_key(key)
            overrides.setdefault(section, {})[name] = value
            parts.append(f"{name}={value}")
        name = ",".join(parts) or "base"
        variant = Variant(name, overrides)
        variant.runs = [root / _slug(name.replace(",", "__").replace("=", "-")) / f"seed-{s}" for s in seeds]
        for seed, run_dir in zip(seeds, variant.runs):
            variant_config(grid, variant, seed, run_dir)  # raises on an unknown key or a bad value
        grid.variants.append(variant)
    return grid


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def is_done(run_dir: Path) -> bool:
    return (run_dir / "done.json").exists()


ATTEMPTS_FILE = "attempts.jsonl"


def _read_attempts(run_dir: Path) -> list[dict]:
    """Every launch of this run: its start (epoch seconds) and wall seconds once known.

    An attempt killed together with the sweep never recorded its seconds; it is taken to have ended
    at the last write to its train.log, which it appended to until it died.
    """
    path = run_dir / ATTEMPTS_FILE
    attempts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    log = run_dir / "train.log"
    for attempt in attempts:
        if attempt["seconds"] is None:
            last_write = log.stat().st_mtime if log.exists() else attempt["start"]
            attempt["seconds"] = max(last_write - attempt["start"], 0.0)
    return attempts


def _write_attempts(run_dir: Path, attempts: list[dict]) -> None:
    tmp = run_dir / (ATTEMPTS_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(a) + "\n" for a in attempts))
    os.replace(tmp, run_dir / ATTEMPTS_FILE)


def run_one(grid: Grid, variant: Variant, seed: int, run_dir: Path, env: dict | None = None) -> float:
    """Train one (variant, seed) in a child process; resumes a killed run.

    Returns the run's wall seconds over all its attempts, the killed ones included, so a resumed run
    is not reported as faster than it was.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "sweep_config.yaml"
    save_yaml(variant_config(grid, variant, seed, run_dir), config_path)
    command = [sys.executable, str(TRAIN_SCRIPT)]
    if any((run_dir / "checkpoints").glob("step-*")):
        command += ["--resume", str(run_dir)]
    else:
        # A launch killed before its first checkpoint left logs that start from nothing again.
        command += ["--config", str(config_path), "--overwrite"]
    attempts = _read_attempts(run_dir)
    attempts.append({"start": time.time(), "seconds": None})
    _write_attempts(run_dir, attempts)
    start = time.perf_counter()
    with open(run_dir / "train.log", "a") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    attempts[-1]["seconds"] = time.perf_counter() - start
    _write_attempts(run_dir, attempts)
    if result.returncode != 0:
        raise RuntimeError(f"{variant.name} seed {seed} failed (exit {result.returncode}); see {run_dir / 'train.log'}")
    seconds = sum(a["seconds"] for a in attempts)
    # Written last, after the run's own files: its presence means the run is complete.
    tmp = run_dir / "done.json.tmp"
    tmp.write_text(json.dumps({"variant": variant.name, "seed": seed, "wall_seconds": seconds, "attempts": len(attempts)}))
    os.replace(tmp, run_dir / "done.json")
    return seconds


def pending_runs(grid: Grid) -> list[tuple[Variant, int, Path]]:
    return [
        (variant, seed, run_dir)
        for variant in grid.variants
        for seed, run_dir in zip(grid.seeds, variant.runs)
        if not is_done(run_dir)
    ]


def run_sweep(grid: Grid, devices: list[str] | None = None, log=print) -> None:
    """Run every unfinished (variant, seed): one after another, or one per listed GPU at a time."""
    todo = pending_runs(grid)
    log(f"{len(todo)} of {len(grid.variants) * len(grid.seeds)} runs to do in {grid.out_dir}")
    if not devices:
        for variant, seed, run_dir in todo:
            log(f"run {variant.name} seed {seed}")
            log(f"  done in {run_one(grid, variant, seed, run_dir):.0f} s")
        return
    from concurrent.futures import ThreadPoolExecutor
    from queue import Queue

    free: Queue = Queue()
    for device in devices:
        free.put(device)

    def on_a_free_gpu(job):
        variant, seed, run_dir = job
        device = free.get()
        try:
            log(f"run {variant.name} seed {seed} on GPU {device}")
            return run_one(grid, variant, seed, run_dir, env={"CUDA_VISIBLE_DEVICES": device})
        finally:
            free.put(device)

    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        list(pool.map(on_a_free_gpu, todo))


# ---------------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------------


def run_summary(run_dir: Path) -> dict[str, float]:
    """One run's row: final and best held-out gaps, greedy accuracy, when the gap first fell 20%, totals."""
    records = read_metrics(run_dir)
    steps, gaps = series(records, "eval/trace_gap")
    points = [(s, g) for s, g in zip(steps, gaps) if math.isfinite(g)]
    final_points = [g for g in series(records, "eval/trace_gap_final")[1] if math.isfinite(g)]
    accuracy = [a for a in series(records, "eval/student_greedy_accuracy")[1] if math.isfinite(a)]
    summary = {
        "trace_gap_start": points[0][1] if points else math.nan,
        "trace_gap_end": points[-1][1] if points else math.nan,
        "trace_gap_best": min(g for _, g in points) if points else math.nan,
        "trace_gap_final_end": final_points[-1] if final_points else math.nan,
        "trace_gap_final_best": min(final_points) if final_points else math.nan,
        "greedy_accuracy_end": accuracy[-1] if accuracy else math.nan,
        "steps_to_20pct": math.nan,
        "seconds_to_20pct": math.nan,
        "active_tokens": run_total(records, "opd/active_tokens_total", "opd/active_tokens"),
        "wall_seconds": json.loads((run_dir / "done.json").read_text())["wall_seconds"],
    }
    if points and points[0][1] > 0:
        target = (1 - GAP_DROP) * points[0][1]
        reached = next((s for s, g in points if g <= target), None)
        if reached is not None:
            summary["steps_to_20pct"] = reached
            # Training time up to that eval, plus every eval up to and including it.
            training = sum(to_float(r.get("time/step", 0)) for r in records if r["step"] < reached)
            evals = sum(to_float(r.get("time/eval", 0)) for r in records if r["step"] <= reached)
            summary["seconds_to_20pct"] = training + evals
    return summary


COLUMNS = (
    ("trace_gap_end", "held-out `trace_gap` end", "{:.3f}"),
    ("trace_gap_best", "best", "{:.3f}"),
    ("trace_gap_final_end", "`trace_gap_final` end", "{:.3f}"),
    ("trace_gap_final_best", "best", "{:.3f}"),
    ("greedy_accuracy_end", "greedy acc.", "{:.2f}"),
    ("steps_to_20pct", "steps to -20%", "{:.0f}"),
    ("seconds_to_20pct", "s to -20%", "{:.0f}"),
    ("active_tokens", "active tokens", "{:.0f}"),
    ("wall_seconds", "wall s", "{:.0f}"),
)


def mean_std(values: list[float], fmt: str) -> str:
    """'mean ± std' over the seeds that have a value; '(k/n)' when only k of n seeds reached it."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "—"
    text = fmt.format(statistics.fmean(finite))
    if len(finite) > 1:
        text += " ± " + fmt.format(statistics.stdev(finite))
    if len(finite) < len(values):
        text += f" ({len(finite)}/{len(values)})"
    return text


def results_table(grid: Grid) -> str:
    header = "| variant | start `trace_gap` | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for variant in grid.variants:
        done = [run_dir for run_dir in variant.runs if is_done(run_dir)]
        if not done:
            lines.append(f"| {variant.name} | not run yet |" + " |" * len(COLUMNS))
            continue
        rows = [run_summary(run_dir) for run_dir in done]
        cells = [mean_std([r[key] for r in rows], fmt) for key, _, fmt in COLUMNS]
        start = mean_std([r["trace_gap_start"] for r in rows], "{:.3f}")
        seeds = "" if len(done) == len(variant.runs) else f" ({len(done)}/{len(variant.runs)} seeds)"
        lines.append(f"| {variant.name}{seeds} | {start} | " + " | ".join(cells) + " |")
    note = (
        f"\nMean ± std over seeds {grid.seeds}; held-out rows, lower gap is better; "
        "'(k/n)': only k of n seeds reached it.\n"
    )
    return "\n".join(lines) + "\n" + note


def overlay_chart(grid: Grid, path: Path) -> Path:
    """Held-out trace gap against step, one line per variant (mean over seeds, band = min..max)."""
    fig = Figure(figsize=(7.5, 4.5), dpi=110)
    ax = fig.add_subplot()
    for variant in grid.variants:
        curves = [dict(zip(*series(read_metrics(d), "eval/trace_gap"))) for d in variant.runs if is_done(d)]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[s] for c in curves] for s in steps]
        ax.plot(steps, [statistics.fmean(v) for v in values], marker="o", label=variant.name)
        if len(curves) > 1:
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("eval/trace_gap (held-out, nats/token)")
    ax.set_title(f"held-out teacher-trace gap, mean over seeds {grid.seeds}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_results(grid: Grid) -> str:
    table = results_table(grid)
    (grid.out_dir / "results.md").write_text(table + "\n![held-out trace gap](trace_gap.png)\n")
    overlay_chart(grid, grid.out_dir / "trace_gap.png")
    return table

"""Per-step metrics: one JSONL line per step in the run directory and a one-line console summary.

Only the main rank writes; the metric names are DESIGN.md's and are part of the interface.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm

SUMMARY_KEYS = (
    ("opd/sampled_reverse_kl", "rkl", "{:.4f}"),
    ("opd/active_tokens", "tok", "{:.0f}"),
    ("groups/sampled", "grp", "{:.0f}"),
    ("rollout/trainer_lp_mismatch", "mism", "{:.2e}"),
    ("sync/parity_max_abs", "parity", "{:.2e}"),
    ("time/step", "s", "{:.1f}"),
)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it visible rather than failing the run
    return value


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a") if enabled else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        tqdm.write(format_summary(step, metrics))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def format_summary(step: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}"]
    for key, short, fmt in SUMMARY_KEYS:
        if key in metrics:
            parts.append(f"{short}={fmt.format(metrics[key])}")
    return " ".join(parts)


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]

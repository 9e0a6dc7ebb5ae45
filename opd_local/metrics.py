"""Per-step metrics: one JSONL line per step in the run directory, TensorBoard scalars beside it,
optionally Weights & Biases, and a one-line console summary.

Only the main rank writes; the metric names are those of docs/design.md, "Metrics", and are part of the interface.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"

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


def device_clock(device: torch.device) -> float:
    """`time.perf_counter()` once `device` has run everything queued on it: CUDA kernels run after
    the host has moved on, so without the wait a stage's kernels would be billed to the next one."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def span(metrics: dict[str, float], stage: str, device: torch.device):
    """`metrics["time/<stage>"]` = seconds the block took, its device work included (a stage boundary: one sync)."""
    start = device_clock(device)
    yield
    metrics[f"time/{stage}"] = device_clock(device) - start


def import_wandb():
    """wandb is optional: import it only when asked for, and say how to get it when it is missing."""
    try:
        import wandb
    except ImportError as err:
        raise ImportError(
            "run.wandb is on but wandb is not installed: `pip install wandb` (or turn run.wandb off)"
        ) from err
    return wandb


class MetricsLogger:
    """Writes RUN_DIR/metrics.jsonl and TensorBoard event files in RUN_DIR; W&B when `wandb_project` is set."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        *,
        wandb_project: str | None = None,
        wandb_config: dict | None = None,
        purge_step: int | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        # Every rank checks for wandb so that a missing install stops all ranks alike, before step 0.
        wandb = import_wandb() if wandb_project else None
        self._file = open(self.path, "a") if enabled else None
        self._tb = None
        self._wandb_run = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # lazy: report readers need not import it

            # purge_step hides TensorBoard events a killed run wrote after its last checkpoint.
            self._tb = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
            if wandb is not None:
                self._wandb_run = wandb.init(
                    project=wandb_project, name=Path(run_dir).name, dir=str(run_dir), config=wandb_config
                )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        for key, value in numeric.items():
            self._tb.add_scalar(key, value, global_step=step)
        self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(numeric, step=step)
        tqdm.write(format_summary(step, metrics))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def format_summary(step: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}"]
    for key, short, fmt in SUMMARY_KEYS:
        if key in metrics:
            parts.append(f"{short}={fmt.format(metrics[key])}")
    return " ".join(parts)


RUN_LOGS = (METRICS_FILE, "trace_eval.jsonl")


def records_before(path: Path, step: int) -> tuple[list[str], int | None]:
    """The lines of a JSONL log whose records are of steps before `step`, and the number of a last
    line cut off mid-write (None if there is none).

    Such a line is what a crash while appending leaves, and its step is redone; a bad line anywhere
    else is refused, naming the file and the line.
    """
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept, cut = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        line = line.rstrip("\r\n")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not lines[-1].endswith("\n"):
                cut = number
                continue
            raise ValueError(f"{path}:{number}: not a JSON record ({err.msg} column {err.colno}); fix or delete that line to resume") from err
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: a record must be a JSON object with an integer 'step'")
        if record["step"] < step:
            kept.append(line)
    return kept, cut


def first_missing_step(path: Path, step: int) -> int | None:
    """The first of steps 0 .. step-1 that the JSONL log at `path` holds no whole record of, or None."""
    if not Path(path).exists():
        return None
    kept, _ = records_before(path, step)
    logged = {json.loads(line)["step"] for line in kept}
    return next((s for s in range(step) if s not in logged), None)


def flush_logs_to_disk(run_dir: Path, names=RUN_LOGS) -> None:
    """fsync the run's JSONL logs, so that a checkpoint, flushed itself, never outlives the records before it."""
    for name in names:
        path = Path(run_dir) / name
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def check_run_logs(run_dir: Path, step: int, names=RUN_LOGS) -> None:
    """Refuse a resume whose logs cannot be cut back to `step`; reads only."""
    for name in names:
        if (Path(run_dir) / name).exists():
            records_before(Path(run_dir) / name, step)


def drop_records_from(run_dir: Path, step: int, names=RUN_LOGS) -> None:
    """Rewrite the run's JSONL logs without records of `step` and later (atomically)."""
    for name in names:
        path = Path(run_dir) / name
        if not path.exists():
            continue
        kept, cut = records_before(path, step)
        if cut is not None:
            warnings.warn(f"{path}:{cut}: dropping the last line, cut off while it was written")
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / METRICS_FILE) as f:
        return [json.loads(line) for line in f if line.strip()]

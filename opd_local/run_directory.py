"""The run directory: a new run never clobbers an old one, and a resume continues exactly or is refused.

`check_run_directory` only reads, so a run it refuses leaves the directory byte-identical;
`start_run_directory` writes (config.yaml, logs cut back to the resumed step) once the run has
passed every check and its models have loaded.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from opd_local.checkpoint import CHECKPOINTS, newest_intact_checkpoint
from opd_local.config import Config, ConfigError
from opd_local.config_parsing import apply_overrides, load_saved_yaml, resume_changes, save_yaml
from opd_local.metrics import METRICS_FILE, check_run_logs, drop_records_from

CONFIG_FILE = "config.yaml"
FINAL_MODEL = "final"  # the trained student's save_pretrained export
# What a run writes into its directory; `--overwrite` deletes these and nothing else (a sweep keeps
# its own files, train.log and attempts.jsonl, in the same folder).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, "trace_eval.jsonl", "trace_cache.json", "summary.md", "eval_metrics.json")
RUN_FOLDERS = (CHECKPOINTS, FINAL_MODEL, "charts")
RUN_GLOBS = ("events.out.tfevents.*",)


@dataclass
class ResumePoint:
    checkpoint: Path
    step: int
    progress: dict
    changes: dict  # {setting: (saved, now)} given with --resume


def run_artefacts(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    found = [run_dir / name for name in RUN_FILES + RUN_FOLDERS if (run_dir / name).exists()]
    return found + [p for pattern in RUN_GLOBS for p in sorted(run_dir.glob(pattern))]


def check_run_directory(cfg: Config) -> ResumePoint | None:
    """Refuse a new run into a directory that holds one (unless run.overwrite), or a resume that cannot be exact.

    Reads only. For a resume: the saved config must load, the flags given may not change the model,
    the data or the seed, the newest intact checkpoint (damaged newer ones are named in a warning)
    must not be past run.steps, and the JSONL logs must parse (a last line cut off mid-write aside).
    """
    run_dir = Path(cfg.run.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.out_dir={str(run_dir)!r} is a file, not a directory")
    if not cfg.run.resume:
        held = run_artefacts(run_dir)
        if held and not cfg.run.overwrite:
            raise ConfigError(
                f"run.out_dir={str(run_dir)!r} already holds a run ({held[0].name}); pass --overwrite to replace it, "
                f"--resume {run_dir} to continue it, or another --out_dir"
            )
        return None
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such directory")
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise ConfigError(f"--resume {run_dir}: no {CONFIG_FILE} there; is it a run directory?")
    saved = load_saved_config(saved_path)
    changes = resume_changes(saved, cfg)
    checkpoint, progress = newest_intact_checkpoint(run_dir)
    step = progress["step"]
    if step > cfg.run.steps:
        raise ConfigError(f"--run.steps {cfg.run.steps} is below the step of the checkpoint resumed from ({checkpoint.name})")
    check_run_logs(run_dir, step)
    return ResumePoint(checkpoint, step, progress, changes)


def load_saved_config(saved_path: Path) -> Config:
    """A run's saved config.yaml as a Config (keys it lacks keep the current defaults)."""
    return apply_overrides(Config(), load_saved_yaml(saved_path), source=str(saved_path))


def saved_run_teacher(model_dir: str) -> str | None:
    """The teacher of the training run whose `final/` export `model_dir` is, from the run's config.yaml; else None.

    A run's empty `model.teacher` means its student's starting weights, which the saved config names.
    """
    saved_path = Path(model_dir).parent / CONFIG_FILE
    if Path(model_dir).name != FINAL_MODEL or not saved_path.is_file():
        return None
    saved = load_saved_config(saved_path)
    return saved.model.teacher or saved.model.student


def start_run_directory(cfg: Config, resume: ResumePoint | None) -> None:
    """Write the checked run's config.yaml, after clearing an overwritten run or cutting a resumed one's logs back."""
    run_dir = Path(cfg.run.out_dir)
    if resume is None and cfg.run.overwrite:
        for path in run_artefacts(run_dir):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        drop_records_from(run_dir, resume.step)  # a killed run's steps after its checkpoint are redone
        if resume.changes:
            changed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in resume.changes.items())
            print(f"resuming {run_dir} at step {resume.step} with {changed}", file=sys.stderr)
    save_yaml(cfg, run_dir / CONFIG_FILE)

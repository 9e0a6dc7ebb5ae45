"""The run directory: one owner, a new run never clobbers an old one, and a resume continues exactly or is refused.

`claim_run_directory` takes the directory's lock (`run_lock`) before anything reads or writes it;
`check_run_directory` only reads, so a run it refuses leaves the directory byte-identical;
`start_run_directory` writes (config.yaml, logs cut back to the resumed step) once the run has
passed every check and its models have loaded. An overwritten run is moved aside, not deleted, until
the new run stands (`Overwrite`): see docs/design.md, "The run directory".
"""

from __future__ import annotations

import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from opd_local.atomic_files import fsync_path
from opd_local.checkpoint import CHECKPOINTS, newest_intact_checkpoint
from opd_local.config import Config, ConfigError
from opd_local.config_files import load_saved_yaml, save_yaml
from opd_local.config_parsing import apply_overrides, resume_changes
from opd_local.exits import RunInterrupted
from opd_local.metrics import METRICS_FILE, check_run_logs, drop_records_from, first_missing_step
from opd_local.run_lock import RunDirectoryLock

CONFIG_FILE = "config.yaml"
FINAL_MODEL = "final"  # the trained student's save_pretrained export
# What a run writes into its directory; `--overwrite` deletes these and nothing else (a sweep keeps
# its own files, train.log and attempts.jsonl, in the same folder).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, "trace_eval.jsonl", "trace_cache.json", "summary.md", "eval_metrics.json")
RUN_FOLDERS = (CHECKPOINTS, FINAL_MODEL, "charts")
RUN_GLOBS = ("events.out.tfevents.*",)
# Where `--overwrite` keeps the run it replaces until the new one stands.
REPLACED = ".opd-local-replaced"
REPLACING = ".opd-local-replacing"  # the same while it is being filled: a run killed then has written nothing yet


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
    # A step the checkpoint counts but the metrics lack (a line cut off mid-write, say) is redone from
    # an older checkpoint where one is kept; else the log keeps that gap, and the warning says so.
    missing = first_missing_step(run_dir / METRICS_FILE, step)
    if missing is not None:
        try:
            checkpoint, progress = newest_intact_checkpoint(run_dir, at_most=missing)
            step = progress["step"]
            warnings.warn(f"{run_dir / METRICS_FILE} has no record of step {missing}: resuming from {checkpoint.name} to redo it")
        except ValueError:
            warnings.warn(
                f"{run_dir / METRICS_FILE} has no record of step {missing}, and no checkpoint at or before it is kept: "
                f"resuming from {checkpoint.name}, so the log will lack that step"
            )
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


def claim_run_directory(cfg: Config) -> RunDirectoryLock:
    """Take the run directory's lock (refusing when a live process holds it), then put back a run that an
    `--overwrite` killed before its replacement stood had set aside. The caller releases the lock."""
    run_dir = Path(cfg.run.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.out_dir={str(run_dir)!r} is a file, not a directory")
    lock = RunDirectoryLock(run_dir)
    lock.acquire()
    try:
        for aside in (REPLACING, REPLACED):
            if (run_dir / aside).is_dir():
                Overwrite(run_dir, run_dir / aside).restore()
                warnings.warn(f"{run_dir}: an --overwrite was stopped before its run stood; the run it replaced is back in place")
    except BaseException:
        lock.release()
        raise
    return lock


def interrupted(run_dir: Path, position: str | None, restored: bool) -> RunInterrupted:
    """`position`: where the run was ("at step 3"), or None before it wrote anything."""
    if position is None:
        return RunInterrupted("interrupted before step 0; nothing in the run directory was written")
    where = f"interrupted {position}"
    if restored:
        return RunInterrupted(f"{where}, before the new run's first checkpoint; {run_dir} holds the run it replaced, as it was")
    try:
        checkpoint, _ = newest_intact_checkpoint(run_dir)
    except ValueError:
        return RunInterrupted(f"{where}; the run has no checkpoint to resume from (run.save_every writes them)")
    return RunInterrupted(f"{where}; resume with --resume {run_dir} (from {checkpoint.name})")


class Overwrite:
    """The replaced run, kept under `REPLACED` until the new run stands (its first checkpoint, or its end)."""

    def __init__(self, run_dir: Path, aside: Path):
        self.run_dir, self.aside = Path(run_dir), Path(aside)
        self.done = False

    @classmethod
    def set_aside(cls, run_dir: Path) -> Overwrite:
        filling = Path(run_dir) / REPLACING
        filling.mkdir()
        for path in run_artefacts(run_dir):
            path.rename(filling / path.name)
        fsync_path(filling)
        aside = filling.rename(Path(run_dir) / REPLACED)
        fsync_path(Path(run_dir))
        return cls(run_dir, aside)

    def commit(self) -> None:
        """The new run stands: the replaced one goes."""
        if not self.done:
            shutil.rmtree(self.aside)
            self.done = True

    def restore(self) -> None:
        """The new run failed before it stood: its files go and the replaced run's come back, as they were."""
        if self.done:
            return
        for path in run_artefacts(self.run_dir):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for path in sorted(self.aside.iterdir()):
            path.rename(self.run_dir / path.name)
        self.aside.rmdir()
        fsync_path(self.run_dir)
        self.done = True


def start_run_directory(cfg: Config, resume: ResumePoint | None) -> Overwrite | None:
    """Write the checked run's config.yaml, after moving an overwritten run aside or cutting a resumed one's logs back.

    Returns the overwritten run's `Overwrite`, which the caller commits once the new run stands or
    restores when it fails before that.
    """
    run_dir = Path(cfg.run.out_dir)
    overwrite = None
    if resume is None and cfg.run.overwrite and run_artefacts(run_dir):
        overwrite = Overwrite.set_aside(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        drop_records_from(run_dir, resume.step)  # a killed run's steps after its checkpoint are redone
        if resume.changes:
            changed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in resume.changes.items())
            print(f"resuming {run_dir} at step {resume.step} with {changed}", file=sys.stderr)
    save_yaml(cfg, run_dir / CONFIG_FILE)
    return overwrite

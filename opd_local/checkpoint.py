"""Checkpoints: the final `save_pretrained` export and the resumable training state.

Both are written under a temporary name and renamed into place, so a crash mid-write leaves the
previous checkpoint intact and no half-written one behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from opd_local import dist


def save_pretrained_atomic(model, tokenizer, target: Path) -> Path:
    """`save_pretrained` (safetensors) + tokenizer into `target`, replacing it atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- resumable training state

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(run_dir: Path, step: int, student, optimizer, scheduler, progress: dict, ctx, keep: int) -> Path:
    """Everything needed to continue exactly after `step` completed steps, written atomically.

    Every rank writes its RNG state; the main rank writes the weights (all of them, adapters
    included: safetensors, tied tensors handled), optimizer and scheduler state and the run's
    progress (data cursor, counters), then renames the directory into place and moves `latest`.
    """
    root = Path(run_dir) / CHECKPOINTS
    target = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(_rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
    if ctx.is_main:
        save_model(student, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": step, **progress}))
    dist.barrier()
    if ctx.is_main:
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(target.name)
        os.replace(pointer, root / LATEST)
        for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    return pointer.parent / pointer.read_text().strip()


def read_progress(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "progress.json").read_text())


def load_training_state(checkpoint: Path, student, optimizer, scheduler, ctx) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the saved progress."""
    load_model(student, str(checkpoint / "model.safetensors"), device=str(next(student.parameters()).device))
    # weights_only: a checkpoint is data, never code.
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = checkpoint / f"rng_rank{ctx.rank}.pt"
    if not rng_file.exists():
        raise RuntimeError(f"{checkpoint} has no RNG state for rank {ctx.rank}: resume with the same number of ranks")
    _set_rng_state(torch.load(rng_file, weights_only=True))
    return read_progress(checkpoint)

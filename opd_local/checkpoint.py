"""Atomic checkpoint writing: a directory is written under a temporary name, then renamed.

A crash mid-write leaves the previous checkpoint intact and no half-written one behind.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


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

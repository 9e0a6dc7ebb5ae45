"""A failed write as one line naming the path; a full disk also says how many bytes were needed and are free.

The writers fail in their own words: safetensors with `SafetensorError ... No space left on device`,
torch.save with `[enforce fail at inline_container.cc] . unexpected pos`, which names no file and
does not say the disk is full. `writing()` removes the half-written temporary and raises `WriteFailed`
(an OSError, so the command line prints it as one `error:` line).
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

# A full disk, a full quota, or a file-size limit (`ulimit -f`): each is "no room for these bytes".
NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up", errno.EFBIG: "a file-size limit (ulimit -f) was reached"}
# How the writers that do not raise OSError say the same (safetensors' Rust io::Error text, torch's zip writer).
NO_ROOM_TEXT = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT, "File too large": errno.EFBIG}
TORCH_WRITE_FAILURE = ("PytorchStreamWriter failed", "unexpected pos", "inline_container")


class WriteFailed(OSError):
    pass


def tensor_bytes(tensors: Iterable) -> int:
    """Bytes of every tensor in a (nested) collection of tensors, dicts and lists."""
    total = 0
    stack = list(tensors) if not isinstance(tensors, dict) else list(tensors.values())
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _size(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _no_room_errno(err: BaseException) -> int | None:
    if isinstance(err, OSError) and err.errno in NO_ROOM:
        return err.errno
    text = str(err)
    return next((code for words, code in NO_ROOM_TEXT.items() if words in text), None)


def write_failure(err: BaseException, target: Path, what: str, need_bytes: int | None) -> WriteFailed | None:
    """`err`, raised while writing `what` to `target`, as one line; None when it is not a write failure."""
    code = _no_room_errno(err)
    free = _free_bytes(Path(target))
    need = f"about {_size(need_bytes)}" if need_bytes else "more room"
    if code is None and any(words in str(err) for words in TORCH_WRITE_FAILURE):
        # torch's writer says only that the bytes it wrote are not all there.
        if need_bytes and free is not None and free < need_bytes:
            code = errno.ENOSPC
        else:
            return WriteFailed(f"cannot write {what} to {target}: the write stopped short ({_size(free)} free on its disk)")
    if code is not None:
        failure = WriteFailed(f"cannot write {what} to {target}: {NO_ROOM[code]}; it needs {need} and {_size(free)} are free on its disk")
        failure.errno = code
        return failure
    if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":
        reason = " ".join(str(getattr(err, "strerror", None) or err).split())
        return WriteFailed(f"cannot write {what} to {target}: {reason}")
    return None


@contextlib.contextmanager
def writing(target: Path, what: str, need_bytes: int | None = None, temporary: Path | None = None) -> Iterator[None]:
    """Run the block that writes `what` to `target` (through `temporary`, removed if the block fails)."""
    try:
        yield
    except BaseException as err:  # Ctrl-C mid-write too leaves no temporary behind
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        if not isinstance(err, Exception):
            raise
        failure = write_failure(err, Path(target), what, need_bytes)
        if failure is None:
            raise
        raise failure from err

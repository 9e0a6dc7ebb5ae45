"""Files and folders replaced whole: a folder swapped into place in one step where the file system allows, the
flushes that make a rename name whole files after a power loss, and the modes a temporary folder lacks.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system or kernel without the flag
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_directory(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target`, so that `target` is at every moment the old or the new folder.

    Where the two cannot be swapped in one step, the old folder is renamed aside first: a crash in
    between leaves it whole under `.NAME-old`.
    """
    _fsync_tree(new)
    if not target.exists() and not target.is_symlink():
        new.rename(target)
    elif _exchange(new, target):
        _remove(new)  # now what `target` was: a folder, or a link or file in its place
    else:
        old = target.with_name(f".{target.name}-old")
        _remove(old)
        target.rename(old)
        new.rename(target)
        _remove(old)
    fsync_path(target.parent)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some network and FUSE file systems cannot fsync a folder; its files are flushed all the same.
        if not (path.is_dir() and err.errno in (errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM)):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush a folder's files and entries to disk, so that a rename after a power loss names whole files."""
    for path in sorted(folder.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def with_umask_modes(folder: Path) -> None:
    """Give a folder and its files the modes a plain mkdir and open would have.

    mkdtemp makes the folder 0700 and the weights are written through temporary files of mode 0600,
    so the exported model would be readable by its owner alone.
    """
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)

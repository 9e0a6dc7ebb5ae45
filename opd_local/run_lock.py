"""One owner per run directory: a lock file held for the life of the run (docs/design.md, "The run directory").

The lock is `OUT_DIR/.opd-local.lock`, held with `flock`: the kernel lets go of it when its process
exits, however it exits, so a lock left by a killed run is stale by construction and the next run
takes it over. The file names its holder (pid, host, start time) for the refusal a second run gets.
Where the file system has no `flock` (some network mounts), the holder is judged by its pid instead,
which is only decidable on the same host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

LOCK_FILE = ".opd-local.lock"


class RunDirectoryBusy(ValueError):
    """Another live process holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunDirectoryLock:
    """Take with `acquire()` before anything in the directory is written; `release()` on every exit.

    A directory that did not exist is created for the lock and removed again on release if the run
    left nothing in it, so a refused new run leaves no trace.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> None:
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            self._created_dir = True
        try:
            self._take()
        except BaseException:
            self._remove_created_dir()
            raise

    def _take(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                held = self._lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not held:
                holder = self.holder()
                os.close(fd)
                raise RunDirectoryBusy(f"run.out_dir={str(self.run_dir)!r} is in use by {describe(holder)}; wait for it to end or use another --out_dir")
            # The file may have been unlinked by its last holder between our open and our lock:
            # then the lock is on a file nobody else will find, and we try again on the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        os.fsync(fd)
        self._fd = fd

    def _lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        # No flock here: the holder the file names is live if it is this host's process that still runs.
        holder = self.holder()
        if holder and holder.get("pid") != os.getpid():
            if holder.get("host") != socket.gethostname() or _pid_alive(int(holder.get("pid", 0))):
                return False
            warnings.warn(f"{self.path}: taking over the lock of {describe(holder)}, which no longer runs")
        return True

    def holder(self) -> dict | None:
        try:
            record = json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding the lock, so that no process locks the old file after we let go.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        if self._created_dir:
            try:
                self.run_dir.rmdir()  # only when empty: a run that wrote something keeps its directory
            except OSError:
                pass
            self._created_dir = False

    def __enter__(self) -> RunDirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process (its lock file names none yet)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')})"

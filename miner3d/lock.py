"""The lock of a run directory: one writer at a time, stale locks detected.

``.lock`` holds the writer's host, PID and the process's start time, and its writer holds an
advisory ``flock`` on it for as long as it runs (the kernel drops it when the process dies). A
second writer gets a one-line error naming the holder. A lock counts as stale only when its
PID is dead (or now belongs to another process) on the same host; a lock from another host is
obeyed until the user passes ``--break-lock``. Taking over a stale lock first takes its
``flock``, so of two processes that find the same dead holder, one takes the lock and the
other then finds it held (before, both could unlink and re-create it, and both ran).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from .errors import MinerError

LOCK = ".lock"


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a live
    process from a new one that reuses a dead one's PID; ``None`` where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _link(staged: Path, path: Path) -> None:
    """Create ``path`` with ``staged``'s content, atomically, failing with
    ``FileExistsError`` if it exists: a hard link; where the file system has none, an
    exclusive create and a copy (a reader may then briefly see it empty)."""
    try:
        os.link(staged, path)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(staged.read_text())


def _flock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting; ``False`` if another open
    file holds it. Where there is no ``flock`` (not POSIX), ``True``: the PID check decides."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock: the PID check decides
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    now = _process_start(pid)
    return started is None or now is None or now == started


class RunLock:
    """The lock of a run directory: ``.lock`` holds the writer's host, PID and start time.

    Taking it creates the file exclusively (``O_EXCL``); a second writer gets a one-line error
    naming the process that holds it. A lock whose process is dead on this host (or whose PID
    now belongs to another process) is stale and is taken over; a lock from another host is
    obeyed until ``break_lock``.
    """

    def __init__(self, run_dir: Path, break_lock: bool = False):
        self.path = run_dir / LOCK
        self.break_lock = break_lock
        self.held = False
        self._fd: int | None = None

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _hold(self, fd: int) -> RunLock:
        self._fd, self.held = fd, True
        return self

    def acquire(self) -> RunLock:
        """Take the lock, or raise a one-line :class:`MinerError` naming its holder. The lock
        file appears whole or not at all (written aside, then hard-linked into place, which
        fails if a lock exists), so a reader never sees a half-written one; a stale one is
        replaced (renamed over) only while its ``flock`` is held, and only if ``.lock`` still
        names the file whose ``flock`` was taken."""
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        staged = self.path.with_name(f"{LOCK}.{me['host']}.{me['pid']}.tmp")
        try:
            staged.write_text(json.dumps(me))
        except OSError as exc:
            raise MinerError(f"cannot lock {self.path.parent}: {exc.strerror or exc}") from None
        try:
            for _ in range(20):
                try:
                    _link(staged, self.path)
                except FileExistsError:
                    taken = self._take_over(staged, me)
                    if taken is None:  # it changed under us: look again
                        continue
                    return taken
                except OSError as exc:
                    raise MinerError(
                        f"cannot lock {self.path.parent}: {exc.strerror or exc}"
                    ) from None
                fd = os.open(self.path, os.O_RDONLY)
                # a taker that opened our new file before this flock sees us alive and stops
                for _ in range(100):
                    if _flock(fd):
                        return self._hold(fd)
                    time.sleep(0.01)
                os.close(fd)
                raise MinerError(f"could not take the lock of {self.path.parent}")
        finally:
            staged.unlink(missing_ok=True)
        raise MinerError(f"could not take the lock of {self.path.parent}")

    def _take_over(self, staged: Path, me: dict[str, Any]) -> RunLock | None:
        """``.lock`` exists: take it over if its holder is gone (or ``break_lock``), else
        raise naming the holder; ``None`` if the file changed meanwhile (retry)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            free = _flock(fd)
            holder = self._holder()
            pid = None if holder is None else holder.get("pid")
            if not isinstance(pid, int) or pid <= 0:  # unreadable: someone else's, mid-write
                holder = {"pid": "?", "host": "?", "started": "?"}
            stale = free and holder.get("host") == me["host"]
            stale = stale and not _alive(pid, holder.get("process_start"))
            if not (stale or self.break_lock):
                raise MinerError(
                    f"{self.path.parent} is in use by PID {holder.get('pid')} on "
                    f"{holder.get('host')} since {holder.get('started')}; if that process "
                    "is gone, pass --break-lock"
                )
            if free and not _same_file(fd, self.path):  # another taker replaced it first
                return None
            mine = os.open(staged, os.O_RDONLY)
            _flock(mine)  # nobody else knows this file yet
            os.replace(staged, self.path)
            return self._hold(mine)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.held:
            if self._fd is not None and _same_file(self._fd, self.path):
                self.path.unlink(missing_ok=True)  # never a lock another process took over
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
            self._fd = None
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

"""The lock of a run directory: one writer at a time, stale locks detected.

``.lock`` holds the writer's host, PID and the process's start time. A second writer gets a
one-line error naming the holder. A lock counts as stale only when its PID is dead (or now
belongs to another process) on the same host; a lock from another host is obeyed until the
user passes ``--break-lock``.
"""

from __future__ import annotations

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

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> RunLock:
        """Take the lock, or raise a one-line :class:`MinerError` naming its holder. The lock
        file appears whole or not at all (written aside, then hard-linked into place, which
        fails if a lock exists), so a reader never sees a half-written one."""
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
            for _ in range(3):
                try:
                    _link(staged, self.path)
                except FileExistsError:
                    holder = self._holder()
                    pid = None if holder is None else holder.get("pid")
                    if not isinstance(pid, int) or pid <= 0:  # unreadable: someone else's
                        holder = {"pid": "?", "host": "?", "started": "?"}
                    stale = holder.get("host") == me["host"] and not _alive(
                        pid, holder.get("process_start")
                    )
                    if stale or self.break_lock:
                        self.path.unlink(missing_ok=True)
                        continue
                    raise MinerError(
                        f"{self.path.parent} is in use by PID {holder.get('pid')} on "
                        f"{holder.get('host')} since {holder.get('started')}; if that process "
                        "is gone, pass --break-lock"
                    ) from None
                except OSError as exc:
                    raise MinerError(
                        f"cannot lock {self.path.parent}: {exc.strerror or exc}"
                    ) from None
                self.held = True
                return self
        finally:
            staged.unlink(missing_ok=True)
        raise MinerError(f"could not take the lock of {self.path.parent}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

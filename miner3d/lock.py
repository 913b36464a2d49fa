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
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                stale = holder is None or (
                    holder.get("host") == me["host"]
                    and not _alive(int(holder.get("pid", -1)), holder.get("process_start"))
                )
                if stale or self.break_lock:
                    self.path.unlink(missing_ok=True)
                    continue
                raise MinerError(
                    f"{self.path.parent} is in use by PID {holder.get('pid')} on "
                    f"{holder.get('host')} since {holder.get('started')}; if that process is "
                    "gone, pass --break-lock"
                ) from None
            except OSError as exc:
                raise MinerError(f"cannot lock {self.path.parent}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise MinerError(f"could not take the lock of {self.path.parent}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

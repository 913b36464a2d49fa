"""Memory budgets: how much a stage needs, how much the machine has, refusing early; and
how many CPUs this process may use.

At 1024^3 every byte per voxel is a GiB, so each stage that allocates states its peak in
its docstring and calls :func:`preflight` with that figure before allocating.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import time
from typing import Any

from .errors import OutOfMemoryError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int | float) -> int:
    """``"2GB"`` -> 2e9, ``"512MiB"`` -> 2**29, ``1000`` -> 1000; raises ValueError."""
    if isinstance(text, int | float):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 2GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n_bytes: float) -> str:
    """Bytes as a short human string in binary units (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n_bytes) < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_headroom(
    proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> int | None:
    """Bytes this process's own cgroup (and every cgroup above it) still allows, the tightest
    of them: cgroup v2 ``memory.max - memory.current``, or v1 ``memory.limit_in_bytes -
    memory.usage_in_bytes``; ``None`` where no limit applies or none can be read."""
    best = None
    for folder, kind in _cgroup_places(proc_cgroup, root, "memory"):
        names = ("memory.max", "memory.current")
        if kind == "v1":
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        limit, usage = (_read_int(f"{folder}/{name}") for name in names)
        if limit is not None and usage is not None and limit < 1 << 60:
            room = max(0, limit - usage)
            best = room if best is None else min(best, room)
    return best


def _cgroup_places(proc_cgroup: str, root: str, v1: str) -> list[tuple[str, str]]:
    """``(folder, kind)`` of this process's own cgroup and each one above it, own first, in
    the v2 unified hierarchy (``kind`` ``v2``) and in the v1 hierarchy of controller ``v1``."""
    try:
        with open(proc_cgroup) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    places = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base, kind = root, "v2"
        elif v1 in controllers.split(","):
            base, kind = f"{root}/{v1}", "v1"
        else:
            continue
        names = [p for p in path.split("/") if p]
        for depth in range(len(names), -1, -1):
            places.append(("/".join([base, *names[:depth]]), kind))
    return places


def cgroup_cpu_quota(
    proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> float | None:
    """CPUs' worth of time this process's cgroup (and every one above it) allows, the
    tightest: v2 ``cpu.max`` (``quota period``), v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``;
    ``None`` where no quota applies or none can be read (a container limited to 1.5 CPUs
    still sees every host CPU in its affinity mask)."""
    best = None
    for folder, kind in _cgroup_places(proc_cgroup, root, "cpu"):
        quota = None
        if kind == "v2":
            try:
                with open(f"{folder}/cpu.max") as fh:
                    fields = fh.read().split()
            except OSError:
                continue
            if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
                quota = int(fields[0]) / max(1, int(fields[1]))
        else:
            limit = _read_int(f"{folder}/cpu.cfs_quota_us")  # -1 (no quota) reads as None
            period = _read_int(f"{folder}/cpu.cfs_period_us")
            if limit is not None and period:
                quota = limit / period
        if quota is not None and quota > 0:
            best = quota if best is None else min(best, quota)
    return best


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask (``taskset``, SLURM, a container's
    cpuset), capped by its cgroup's CPU quota rounded up; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable, capped by what its own cgroup
    (and those above it) allow."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    room = cgroup_headroom()
    return avail if room is None else min(avail, room)


def preflight(what: str, needed: int, max_memory: int | None = None, hint: str = "") -> None:
    """Raise :class:`OutOfMemoryError` if ``needed`` bytes exceed the budget.

    Args:
        what: the job, as the user would name it (``"voxelizing at 1024^3"``).
        needed: estimated peak bytes of the job.
        max_memory: the budget; defaults to the memory available now.
        hint: what would fit, appended to the message.
    """
    budget = available_memory() if max_memory is None else max_memory
    if needed > budget:
        msg = f"{what} needs ~{format_size(needed)}, but only {format_size(budget)} is available"
        raise OutOfMemoryError(msg + (f"; {hint}" if hint else ""))


def peak_rss() -> int:
    """Peak resident set size of this process image so far, in bytes: VmHWM, which unlike
    ``ru_maxrss`` is not inherited from the parent across fork and exec (ru_maxrss, KiB, is
    the fallback where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tune_heap(mmap_threshold: int = 2 << 20, trim_threshold: int = 32 << 20) -> None:
    """Fix the C heap's thresholds for a fit (glibc ``mallopt``; no-op elsewhere).
    Process-wide and idempotent.

    Blocks of ``mmap_threshold`` bytes or more are served by ``mmap`` and given back to the OS
    when freed; smaller ones come from the heap, which keeps up to ``trim_threshold`` free
    bytes at its top instead of returning them and faulting them in again. A CPU training
    chunk's activations stay under the first (:meth:`miner3d.config.FitConfig.chunk_samples`).
    Measured on the 2-core machine, the 21.5k-block step of Lucy 1024 (2^14-sample chunks):
    0.37 s, against 1.1 s with 1 MiB chunk tensors going by ``mmap`` (page faults at every
    allocation; glibc's adaptive thresholds did that too until a large block happened to be
    freed); 4 MiB and 64 MiB thresholds with 2^15-sample chunks ran 0.34 s but left a 64 MP
    image fit's peak RSS increase 1.8x higher (heap fragments of its streamed passes), 1.2x
    here.
    The bank-sized tensors (gradients, Adam moments) are allocated once per scale
    (:class:`miner3d.bank.BankAdam`).
    """
    global _configured
    if _configured:
        return
    _configured = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


_configured = False


class SharedCpus:
    """Drops torch to one thread when this process gets much less CPU time than its threads
    ask for: another process shares its CPUs, and OpenMP threads that spin in every
    parallel region while their partner is descheduled then slowed a fit 60x (two Lucy 192
    fits side by side on two cores, 2 threads each: 182 s, 3.1 s alone; the step's small
    chunks make many short parallel regions). Measured CPU time over wall time was 2.0
    alone and 1.0 side by side. Nothing is restored: one thread stays for the fit.

    Call :meth:`start` when timing may begin (a scale's first iteration: set-up passes are
    partly serial) and :meth:`check` after each iteration.
    """

    def __init__(self, window: float = 0.5, floor: float = 0.75, active: bool = True):
        import torch

        self.threads = torch.get_num_threads() if active else 1  # 1: never checks
        self.window, self.floor = window, floor
        self.start()

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def check(self) -> bool:
        """True when it has just dropped to one thread."""
        wall = time.perf_counter() - self.wall
        if self.threads <= 1 or wall < self.window:
            return False
        used = (time.process_time() - self.cpu) / wall
        self.start()
        if used >= self.floor * self.threads:
            return False
        import torch

        torch.set_num_threads(1)
        self.threads = 1
        return True


def release_pages(data: Any) -> None:
    """Hand the pages of a memory map (a ``np.memmap`` or a view of one) back to the kernel
    with ``madvise(MADV_DONTNEED)``: they stay in the page cache, and the next read faults
    them in again, so reading a file slab by slab never accumulates it in the resident set.
    No-op for anything else."""
    mm = getattr(data, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED)

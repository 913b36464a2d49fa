"""Several processes fitting one signal with torch.distributed (``torchrun``).

Within a scale MINER's blocks are independent, so the ranks share a scale's blocks: each
trains a contiguous run of the live blocks (balanced by count: every live block costs the
same samples per iteration) with its own optimiser state, and the ranks meet only where the
fit needs the whole scale:

* at every iteration where a common decision can change (:func:`miner3d.stopping.decide_now`),
  one all-reduce of a few numbers: the loss sum, the active blocks, the stop votes (a signal,
  the time limit), so every rank takes the same decisions at the same iteration (and all draw
  the same sample positions);
* at a quality measurement, one all-reduce of the metric sums;
* at a scale's start, an all-to-all of the live block ids to the ranks that train them; before
  each pass over a run of blocks, an all-to-all that brings a rank the coarser scales' blocks
  its run reads (its halo, :mod:`miner3d.sharding`); at the fit's end, the whole model to
  rank 0 alone, which writes it.

:class:`Team` is that whole vocabulary. ``Team()`` (one process) does nothing: a one-rank
fit runs exactly the single-process code. :func:`join` starts a process group from
torchrun's environment (gloo on CPU, NCCL on CUDA) with a 60 s collective timeout, so a dead
rank ends the job within a minute instead of gloo's default 30.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from .errors import MinerError

TIMEOUT_SECONDS = 60.0
T = TypeVar("T")


@dataclass
class Team:
    """The ranks of one fit; ``Team()`` is a single process (every method a no-op)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where collective buffers live (CUDA for NCCL, CPU for gloo)."""

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks of a few float64 numbers (one all-reduce)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``(n_r, ...)`` rows, concatenated in rank order: ``(sum n_r, ...)``
        (on every rank). Memory: world_size times the largest rank's rows, twice."""
        if not self.active:
            return rows
        here = rows.to(self.device)
        counts = torch.tensor([len(here)], device=self.device)
        all_counts = [torch.zeros_like(counts) for _ in range(self.world_size)]
        torch.distributed.all_gather(all_counts, counts)
        sizes = [int(c) for c in all_counts]
        padded = here.new_zeros((max(sizes), *here.shape[1:]))
        padded[: len(here)] = here
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded.contiguous())
        out = torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])
        return out.to(rows.device)

    def all_to_all(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Send ``rows`` ``(n, ...)``, cut in runs of ``counts[q]`` rows for rank ``q`` in
        rank order, and return the runs every rank sent this one, in rank order (one
        all-to-all of the counts, one of the rows). Memory: the rows sent and received."""
        if not self.active:
            return rows
        send = torch.tensor(counts, dtype=torch.long, device=self.device)
        got = torch.empty_like(send)
        torch.distributed.all_to_all_single(got, send)
        sizes = [int(n) for n in got]
        here = rows.to(self.device).contiguous()
        out = here.new_empty((sum(sizes), *here.shape[1:]))
        torch.distributed.all_to_all_single(out, here, sizes, list(counts))
        return out.to(rows.device)

    def broadcast_text(self, text: str) -> str:
        """Rank 0's ``text`` on every rank (UTF-8, cut to 4 KiB)."""
        if not self.active:
            return text
        data = text.encode()[:4096] if self.leader else b""
        buf = torch.zeros(4096, dtype=torch.uint8, device=self.device)
        if data:
            buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        size = torch.tensor([len(data)], device=self.device)
        torch.distributed.broadcast(size, 0)
        torch.distributed.broadcast(buf, 0)
        return bytes(buf[: int(size)].cpu().tolist()).decode(errors="replace")

    def gather_text(self, text: str, size: int = 64) -> list[str]:
        """Every rank's ``text`` (UTF-8, cut to ``size`` bytes), in rank order."""
        if not self.active:
            return [text]
        raw = torch.zeros(size, dtype=torch.uint8)
        data = text.encode()[:size]
        if data:
            raw[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        rows = self.gather_rows(raw[None])
        return [bytes(r.tolist()).rstrip(b"\0").decode(errors="replace") for r in rows]

    def hosts(self) -> list[str]:
        """Every rank's host name, in rank order."""
        return self.gather_text(socket.gethostname())

    def in_turn(self, action: Callable[[bool], T]) -> T:
        """``action(True)`` on rank 0, then ``action(False)`` on the others (which may
        reuse what rank 0 wrote, e.g. a voxelized grid). If rank 0 fails, every rank
        fails: the others with a :class:`MinerError` carrying rank 0's message, and rank 0
        ignores SIGTERM while it ends (:func:`ignore_sigterm`)."""
        if not self.active:
            return action(True)
        if self.leader:
            try:
                result = action(True)
            except MinerError as exc:
                ignore_sigterm()
                self.broadcast_text(str(exc) or "rank 0 failed")
                raise
            except BaseException:
                ignore_sigterm()
                self.broadcast_text("rank 0 failed (see its error)")
                raise
            self.broadcast_text("")
            return result
        failed = self.broadcast_text("")
        if failed:
            raise MinerError(failed)
        return action(False)


def ignore_sigterm() -> None:
    """This rank ends with an error that every rank ends with: torchrun SIGTERMs the ranks
    still running as soon as one exits, which must not cut this one's clean-up and one-line
    error short, so SIGTERM is ignored from here on (main thread only; the rank is ending)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a clear error for CUDA without a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MinerError("CUDA was requested but torch sees no GPU")
    return torch.device(device)


def lost_rank(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away (gloo
    raises plain ``RuntimeError``s naming itself; NCCL and timeouts ``DistError``s)."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("gloo", "Gloo", "NCCL", "Connection closed", "Timed out")
    )


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) with more than
    one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: torch.device) -> str:
    """The process group's backend: ``MINER3D_DIST_BACKEND`` (``gloo`` or ``nccl``) if set,
    else NCCL for CUDA devices and gloo otherwise. gloo with CUDA devices runs several ranks
    on one GPU (NCCL refuses two ranks on one device): their tensors stay on the GPU and
    only the collectives' buffers pass through the CPU."""
    chosen = os.environ.get("MINER3D_DIST_BACKEND", "").strip().lower()
    if chosen and chosen not in ("gloo", "nccl"):
        raise MinerError(f"MINER3D_DIST_BACKEND must be gloo or nccl, not {chosen!r}")
    if chosen == "nccl" and device.type != "cuda":
        raise MinerError("MINER3D_DIST_BACKEND=nccl needs CUDA devices (--device cuda)")
    return chosen or ("nccl" if device.type == "cuda" else "gloo")


def join(device: torch.device) -> tuple[Team, torch.device]:
    """The team of this process and the device it computes on: ``Team()`` unless torchrun
    started several ranks, else a process group (:func:`backend_for`; an existing group is
    reused). A CUDA rank uses GPU ``LOCAL_RANK`` modulo the GPUs it sees."""
    if not launched():
        return Team(device=device), device
    dist = torch.distributed
    backend = backend_for(device)  # before anything starts: a wrong value is one line
    if device.type == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=TIMEOUT_SECONDS)
        dist.init_process_group(backend, timeout=timeout)
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return Team(dist.get_rank(), dist.get_world_size(), comm), device


def leave() -> None:
    """End this process's group, if any (after the last collective)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[tuple[Team, torch.device]]:
    """:func:`join` for the ``with`` block, then :func:`leave` if this call started the
    group (a group the caller started stays theirs). A process that exits with its gloo
    group alive can abort in the group's threads at interpreter exit ("terminate called
    without an active exception", pytorch/pytorch#190489)."""
    dist = torch.distributed
    started = launched() and not (dist.is_available() and dist.is_initialized())
    try:
        yield join(device)
    finally:
        if started:
            leave()


def split_even(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """The ``[start, stop)`` of rank ``rank``'s share of ``n`` items in ``world_size``
    contiguous runs whose sizes differ by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size
